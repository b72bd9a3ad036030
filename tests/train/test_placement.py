"""Where and how the networks run (``train.device``, ``train.channels_last``, ``train.compile``): the same weights, and
a run may change them when it resumes."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import invoke, ok

from conftest import TINY, tiny_method, write_image_folder
from ssl_cli.artifacts.checkpoint import read_checkpoint
from ssl_cli.config.schema import TrainConfig
from ssl_cli.train.placement import encoders, place


def test_compile_compiles_the_backbone_and_its_momentum_copy_in_place(monkeypatch) -> None:
    monkeypatch.setattr("ssl_cli.train.placement.COMPILE_BACKEND", "eager")
    method = tiny_method("mocov2", ("method.queue_size", 64))
    names = list(method.state_dict())
    placed = place(method, TrainConfig(compile=True, channels_last=True), torch.device("cpu"))
    assert set(encoders(placed)) == {"backbone", "key_backbone"}
    assert all(m._compiled_call_impl is not None for m in encoders(placed).values())
    assert placed.projector._compiled_call_impl is None  # heads and losses stay eager
    assert list(placed.state_dict()) == names  # no "_orig_mod." prefixes: checkpoints and exports unchanged
    conv = next(m for m in placed.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    views = [torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    assert torch.isfinite(placed.training_step(views, 0).loss)


def test_a_resumed_run_may_change_its_device_and_how_its_networks_run(tmp_path: Path, monkeypatch) -> None:
    """``--device``, ``train.channels_last`` and ``train.compile`` say where and how, not what: a GPU run may go on on
    the CPU (``tests/train/test_gpu_runs.py`` does that on a GPU); anything else still has to be the saved recipe."""
    monkeypatch.setattr("ssl_cli.train.placement.COMPILE_BACKEND", "eager")
    data = write_image_folder(tmp_path / "data", per_class=8, classes=2)
    sets = [a for k, v in TINY if k != "train.batch_size" for a in ("--set", f"{k}={v}")]
    out = tmp_path / "run"
    ok(invoke("pretrain", "--recipe", "simclr", "--data", data, "--out", out, "--batch-size", "8", *sets))
    ok(invoke(
        "pretrain", "--out", out, "--resume", "--extend-to", "2", "--device", "auto",
        "--set", "train.channels_last=true", "--set", "train.compile=true",
    ))  # fmt: skip
    saved = read_checkpoint(out / "checkpoints/last.safetensors").meta
    assert saved["epoch"] == 2 and saved["recipe"]["train"]["compile"] is True
