"""Weights that do not fit the model they are loaded into: one line naming the first missing / unexpected keys and
shape mismatches with their shapes (torch's message was cut to its first line, ``Error(s) in loading state_dict for
ResNet:``, which says none of it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import EVAL, invoke, rewrite_metadata, set_key, tiny_checkpoint, user_error
from torch import nn

from conftest import write_image_folder
from ssl_cli.artifacts.backbone import load_backbone
from ssl_cli.artifacts.state import load_state, mismatch
from ssl_cli.errors import CheckpointError


def test_mismatch_names_each_kind_with_shapes() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    state = dict(model.state_dict())
    state["0.weight"] = torch.zeros(5, 4)  # another width
    del state["1.bias"]
    state["2.weight"] = torch.zeros(2, 2)
    assert mismatch(model, state) == (
        "1 missing key (1.bias 3); 1 unexpected key (2.weight 2x2); "
        "1 shape mismatch, file vs model (0.weight 5x4 vs 3x4)"
    )
    assert mismatch(model, model.state_dict()) == ""
    with pytest.raises(CheckpointError, match=r"^f: 1 missing key \(1.bias 3\); 1 unexpected key"):
        load_state(model, state, "f")


def test_many_mismatches_are_counted_not_listed() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])
    state = {f"{i}.{p}": torch.zeros(3) for i in range(6) for p in ("weight", "bias")}
    text = mismatch(model, state)
    assert text.startswith("12 shape mismatches, file vs model (0.weight 3 vs 2x2, 0.bias 3 vs 2, 1.weight 3 vs 2x2")
    assert text.endswith(", and 9 more)")


def test_weights_of_another_architecture_say_which_keys_in_one_line(tmp_path: Path) -> None:
    tiny = tiny_checkpoint(tmp_path / "tiny.safetensors")
    export = rewrite_metadata(tiny, tmp_path / "other.safetensors", set_key("backbone.name", "resnet18"))
    with pytest.raises(CheckpointError) as info:
        load_backbone(export)
    message = str(info.value)
    assert message.startswith(f"{export}: the weights do not fit resnet18: 64 missing keys (conv1.weight 64x3x7x7, ")
    assert "unexpected keys (conv1.0.weight 16x3x3x3, " in message
    assert "shape mismatches, file vs model (bn1.weight 32 vs 64, " in message
    assert "Error(s) in loading" not in message and "\n" not in message and len(message) < 500
    data = write_image_folder(tmp_path / "data", per_class=2, classes=2)
    user_error(invoke("knn", export, "--train", data, "--val", data, *EVAL, "--no-cache"), "64 missing keys")
