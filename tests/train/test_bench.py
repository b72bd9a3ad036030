"""``ssl bench``: the three throughputs, their ratios and peak memory, from the library and the CLI."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_SET, invoke, one_json, user_error
from torch import nn

from conftest import TINY, write_image_folder
from ssl_cli.config import load_recipe
from ssl_cli.methods import get_method
from ssl_cli.train.bench import bench, count_flops, encoders, record_encoder_calls, replay_step


@pytest.mark.parametrize("augment", ["sample", "batch", "crop", "auto"])
def test_bench_measures_ceiling_data_and_step(augment: str, tmp_path) -> None:
    data = write_image_folder(tmp_path / "data", per_class=8, classes=2)
    overrides = [*TINY, ("train.batch_size", 8), ("data.augment", augment), ("data.num_workers", 0)]
    result = bench(load_recipe("mocov2", [*overrides, ("method.queue_size", 32)]), str(data), steps=2, warmup_steps=1)
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
    # the step adds the projector and the query-key / query-queue products to the encoder work the ceiling replays
    assert result["step_flops_vs_ceiling"] > 1.0
    assert result["compute_bound_images_per_second"] == pytest.approx(
        result["ceiling_images_per_second"] / result["step_flops_vs_ceiling"]
    )
    assert result["step_vs_compute_bound"] == pytest.approx(
        result["step_images_per_second"] / result["compute_bound_images_per_second"]
    )


def test_count_flops_counts_matrix_products_forward_and_backward() -> None:
    linear, x = nn.Linear(8, 4), torch.randn(5, 8, requires_grad=True)
    forward = 2 * 5 * 8 * 4  # multiply-adds of a 5x8 @ 8x4 product, two operations each
    with torch.no_grad():
        assert count_flops(lambda: linear(x)) == forward
    # backward: the input's gradient and the weight's, one product of the same size each
    assert count_flops(lambda: linear(x).sum().backward()) == 3 * forward


def test_cli_json_and_bad_recipe_key() -> None:
    args = ["bench", "--recipe", "simclr", *TINY_SET, "--batch-size", "8", "--steps", "1", "--warmup-steps", "0"]
    payload = one_json(invoke(*args, "--device", "cpu", "--num-workers", "0", "--json"))
    assert payload["method"] == "simclr" and payload["data"].startswith("demo")
    user_error(invoke("bench", "--recipe", "simclr", "--set", "data.augment=gpu"), "data.augment")


class CountingBackbone(nn.Module):
    """A stand-in backbone that logs every forward (input shape, grad enabled) and every backward through it."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, self.num_features)
        self.forwards: list[tuple[tuple[int, ...], bool]] = []
        self.backwards: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards.append((tuple(x.shape), torch.is_grad_enabled()))
        out = self.linear(x.float().mean((2, 3)))
        if out.requires_grad:
            out.register_hook(lambda g, shape=tuple(x.shape): self.backwards.append(shape))
        return out

    def take_log(self) -> tuple[list, list]:
        log = (self.forwards, self.backwards)
        self.forwards, self.backwards = [], []
        return log


CASES = {
    # name: (recipe, overrides); batch 16
    "mocov2-asymmetric": ("mocov2", [("method.symmetric", False), ("method.shuffle_bn_splits", 4)]),
    "mocov2-symmetric": ("mocov2", [("method.symmetric", True), ("method.shuffle_bn_splits", 4)]),
    "byol": ("byol", []),
    "simclr": ("simclr", []),
    "swav-multicrop": ("swav", [("views.1.size", 16), ("views.1.count", 4)]),
    "dino-multicrop": ("dino", [("views.2.size", 16), ("views.2.count", 4), ("method.num_prototypes", 64)]),
}
KEYS = [("key_backbone", (4, 3, 32, 32), False)] * 4  # the key view, shuffled, in 4 sub-batches, no grad
QUERY = [("backbone", (16, 3, 32, 32), True)]
EXPECTED = {
    "mocov2-asymmetric": KEYS + QUERY,
    "mocov2-symmetric": (KEYS + QUERY) * 2,
    "byol": QUERY * 2 + [("target_backbone", (16, 3, 32, 32), False)] * 2,
    "simclr": [("backbone", (32, 3, 32, 32), True)],
    "swav-multicrop": [("backbone", (32, 3, 32, 32), True), ("backbone", (64, 3, 16, 16), True)],
    "dino-multicrop": [("teacher_backbone", (32, 3, 32, 32), False)]
    + [("backbone", (32, 3, 32, 32), True), ("backbone", (64, 3, 16, 16), True)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_ceiling_replays_exactly_the_encoder_work_of_a_real_step(case: str) -> None:
    """Every backbone / momentum-encoder call of one real step (shape, grad) and every backward through one: the
    replay makes the same, in the same order; MoCo v2 without the symmetric loss runs backward through the query
    view only, its keys through the momentum encoder in shuffle-BN sub-batches."""
    name, extra = CASES[case]
    recipe = load_recipe(name, [*TINY, ("train.batch_size", 16), *extra])
    torch.manual_seed(0)
    method = get_method(name)(recipe.method, CountingBackbone(), recipe)
    method.bind_data(16, None)
    views = [torch.rand(16, 3, v.size, v.size) for v in recipe.views for _ in range(v.count)]
    modules = encoders(method)

    def real_step() -> None:
        method(views, 0, torch.arange(16)).loss.backward()

    calls = record_encoder_calls(method, real_step)
    assert [(c.module, c.shape, c.grad) for c in calls] == EXPECTED[case]
    real = {n: m.take_log() for n, m in modules.items()}
    assert sum(len(b) for _, b in real.values()) == sum(c.grad for c in calls)  # one backward per grad call
    method.zero_grad(set_to_none=True)
    replay_step(method, calls, torch.device("cpu"), "fp32")()
    assert {n: m.take_log() for n, m in modules.items()} == real
    # gradients on the backbone only, as after a step's backward (they stay until the next replay frees them)
    assert all((p.grad is not None) == n.startswith("backbone.") for n, p in method.named_parameters())


def test_without_data_a_short_measurement_on_the_demo_set(monkeypatch, tmp_path) -> None:
    """No --data: batch 64, 8 timed steps after 2 warm-up (~40 s for simclr-cifar on 2 cores); with --data
    or explicit flags: the recipe's batch and 20 / 3, or what was given."""
    import ssl_cli.train.bench

    seen: list[tuple] = []

    def fake(recipe, data, steps, warmup_steps):
        seen.append((recipe.train.batch_size, recipe.backbone.small_stem, data, steps, warmup_steps))
        return {"recipe": recipe.recipe.name}

    monkeypatch.setattr(ssl_cli.train.bench, "bench", fake)
    result = invoke("bench", "--recipe", "simclr-cifar", "--json")
    assert result.exit_code == 0 and "no --data: the built-in demo set" in result.stderr
    assert seen[-1] == (64, True, None, 8, 2)  # the recipe's own CIFAR stem
    invoke("bench", "--recipe", "simclr-cifar", "--batch-size", "32", "--steps", "5", "--warmup-steps", "0", "--json")
    assert seen[-1] == (32, True, None, 5, 0)
    invoke("bench", "--recipe", "simclr-cifar", "--data", str(tmp_path), "--json")
    assert seen[-1] == (256, True, str(tmp_path), 20, 3)


def test_ceiling_and_step_are_timed_in_alternation() -> None:
    from ssl_cli.train.bench import _timed_rounds

    order: list[str] = []
    seconds = _timed_rounds([lambda: order.append("a"), lambda: order.append("b")], 3, 1, torch.device("cpu"))
    assert order == ["a", "b"] * 4 and len(seconds) == 2 and all(s >= 0 for s in seconds)
