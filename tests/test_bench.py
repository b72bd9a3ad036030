"""``ssl bench``: the three throughputs, their ratios and peak memory, from the library and the CLI."""

from __future__ import annotations

import pytest
from test_cli import TINY_SET, invoke, one_json, user_error

from conftest import TINY, write_image_folder
from ssl_cli.bench import bench
from ssl_cli.config import load_recipe


@pytest.mark.parametrize("augment", ["sample", "batch", "auto"])
def test_bench_measures_ceiling_data_and_step(augment: str, tmp_path) -> None:
    data = write_image_folder(tmp_path / "data", per_class=8, classes=2)
    overrides = [*TINY, ("train.batch_size", 8), ("data.augment", augment), ("data.num_workers", 0)]
    result = bench(load_recipe("mocov2", [*overrides, ("method.queue_size", 32)]), str(data), steps=2, warmup=1)
    for key in ("ceiling", "data", "step"):
        assert result[f"{key}_images_per_second"] > 0
    assert result["step_vs_ceiling"] == pytest.approx(
        result["step_images_per_second"] / result["ceiling_images_per_second"]
    )
    assert result["data_vs_ceiling"] == pytest.approx(
        result["data_images_per_second"] / result["ceiling_images_per_second"]
    )
    # the path actually taken: "auto" takes whole batches on a folder of same-size images
    assert result["augment"] == ("batch" if augment == "auto" else augment)
    assert result["views"] == [[3, 32, 32], [3, 32, 32]]
    assert result["peak_memory_mb"] > 0
    # MoCo's key encoder forward (the key view of every image; mocov2 is asymmetric) counts in the ceiling
    assert sum(shape[0] for shape in result["momentum_encoder_forwards"]) == 8
    assert result["ceiling_images_per_second"] < result["backbone_images_per_second"]


def test_cli_json_and_bad_recipe_key() -> None:
    args = ["bench", "--recipe", "simclr", *TINY_SET, "--batch-size", "8", "--steps", "1", "--warmup", "0"]
    payload = one_json(invoke(*args, "--device", "cpu", "--num-workers", "0", "--json"))
    assert payload["method"] == "simclr" and payload["data"].startswith("demo")
    user_error(invoke("bench", "--recipe", "simclr", "--set", "data.augment=gpu"), "data.augment")
