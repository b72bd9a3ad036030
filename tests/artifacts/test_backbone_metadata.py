"""A checkpoint's metadata cannot make ssl (or timm through it) read a file or reach the network: the backbone's
timm keyword arguments are architecture only, in recipes and in the files a stranger hands you."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import EVAL, invoke, tiny_checkpoint, user_error

from conftest import write_image_folder
from ssl_cli.artifacts.backbone import load_backbone
from ssl_cli.artifacts.safetensors_io import atomic_save, read_safetensors
from ssl_cli.config import load_recipe
from ssl_cli.errors import CheckpointError, RecipeError


class Payload:
    """Unpickling this runs code: it creates ``marker`` (what a malicious ``.pt`` would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _poisoned(tmp_path: Path, kwargs: dict) -> tuple[Path, Path, Path]:
    marker = tmp_path / "code-ran"
    evil = tmp_path / "weights.pt"
    torch.save(Payload(marker), evil)  # what timm's checkpoint loader would torch.load
    ckpt = tiny_checkpoint(tmp_path / "export.safetensors")
    tensors, meta = read_safetensors(ckpt)
    meta["backbone"]["kwargs"] = {k: str(evil) if v == "EVIL" else v for k, v in kwargs.items()}
    atomic_save(tensors, meta, ckpt)
    return ckpt, evil, marker


@pytest.mark.parametrize(
    "kwargs",
    [{"checkpoint_path": "EVIL"}, {"pretrained": True}, {"pretrained_cfg_overlay": "EVIL"}, {"cache_dir": "EVIL"}]
    + [{"global_pool": "EVIL"}],
    ids=["checkpoint_path", "pretrained", "pretrained_cfg_overlay", "cache_dir", "a-path-as-a-value"],
)
def test_a_checkpoint_naming_a_file_for_timm_is_refused_and_its_payload_never_runs(kwargs, tmp_path: Path) -> None:
    ckpt, evil, marker = _poisoned(tmp_path, kwargs)
    data = write_image_folder(tmp_path / "data", per_class=4, classes=2)
    result = invoke("knn", ckpt, "--train", data, "--val", data, *EVAL, "--no-cache")
    user_error(result, "metadata backbone.kwargs")
    with pytest.raises(CheckpointError, match="metadata backbone.kwargs"):
        load_backbone(ckpt)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: loading it the unsafe way does run it
    assert marker.exists()


def test_recipes_take_architecture_kwargs_only() -> None:
    assert load_recipe("mocov3-vit").backbone.kwargs == {"num_heads": 12}
    assert load_recipe("simclr", ["backbone.kwargs.drop_path_rate=0.1"]).backbone.kwargs["drop_path_rate"] == 0.1
    for bad, match in [
        ("backbone.kwargs.checkpoint_path='/tmp/x.pt'", "'checkpoint_path' is not an architecture argument"),
        ("backbone.kwargs.hf_hub_id='timm/x'", "'hf_hub_id'"),
        ("backbone.kwargs.num_classes=10", "'num_classes'"),
        ("backbone.kwargs.global_pool='../../x'", "must be a plain name"),
        ("backbone.kwargs.mlp_ratio=inf", "backbone.kwargs.mlp_ratio"),  # every number of a recipe is finite
    ]:
        with pytest.raises(RecipeError, match=match) as info:
            load_recipe("simclr", [bad])
        assert str(info.value).startswith("--set backbone.kwargs")  # blamed on the command line, not the file
