"""A run on the GPU end to end (``pytest -m cuda``): pretraining with channels-last and ``torch.compile``, export, kNN
and the linear probe on the GPU against the CPU, and the run resumed on the CPU. Skipped without CUDA; the GPU
check's dry run (``benchmarks/gpu_check.py --dry-run``) runs them on the CPU, without ``torch.compile`` there
(``tests/train/test_placement.py`` covers its wiring)."""

from __future__ import annotations

import json
import math

import pytest
from helpers import invoke, ok, one_json

from conftest import TINY, cuda_test_device, write_image_folder
from ssl_cli.artifacts.checkpoint import read_checkpoint
from ssl_cli.config import recipe_from_dict
from ssl_cli.train.pretrain import build_method

pytestmark = pytest.mark.cuda


def on_the(device) -> list[str]:
    """Channels-last, and on CUDA torch.compile (on the CPU the dry run leaves the compiler out: tracing the network
    costs it 20 s; ``tests/train/test_placement.py`` and the check's ``compile`` row cover the wiring there)."""
    compiled = "true" if device.type == "cuda" else "false"
    return ["--set", "train.channels_last=true", "--set", f"train.compile={compiled}"]


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory) -> dict:
    """Two epochs of tiny SimCLR on the test device, channels-last (and compiled on CUDA), exported: its paths."""
    device = cuda_test_device()
    root = tmp_path_factory.mktemp("gpu-run")
    data = write_image_folder(root / "train", per_class=16, classes=4)
    val = write_image_folder(root / "val", per_class=8, classes=4, split="test")
    sets = [a for k, v in TINY if k not in ("train.epochs", "train.device") for a in ("--set", f"{k}={v}")]
    sets += ["--set", "method.proj_hidden_dim=64", "--set", "method.proj_output_dim=32"]
    out = root / "run"
    result = one_json(ok(invoke(
        "pretrain", "--recipe", "simclr", "--data", data, "--out", out, "--epochs", "2", "--batch-size", "16",
        *sets, *on_the(device), "--device", device.type, "--json",
    )))  # fmt: skip
    exported = root / "backbone.safetensors"
    ok(invoke("export", out / "checkpoints/last.safetensors", "--out", exported))
    return {"device": device, "data": data, "val": val, "out": out, "result": result, "exported": exported}


def test_a_gpu_run_with_channels_last_and_compile_trains_and_keeps_its_weights_names(gpu_run):
    assert math.isfinite(gpu_run["result"]["loss"]) and gpu_run["result"]["epochs"] == 2
    ckpt = read_checkpoint(gpu_run["out"] / "checkpoints/last.safetensors")
    recipe = recipe_from_dict(ckpt.meta["recipe"], "checkpoint")
    assert recipe.train.compile == (gpu_run["device"].type == "cuda") and recipe.train.channels_last
    assert recipe.train.device == gpu_run["device"].type
    # compiled in place: the same parameter names as the plain network (no "_orig_mod." prefixes)
    assert set(ckpt.section("model")) == set(build_method(recipe).state_dict())


def _evaluate(gpu_run: dict, command: str, device: str) -> dict:
    extra = ["--epochs", "5", "--batch-size", "16"] if command == "probe" else ["--k", "5"]
    args = ["--train", gpu_run["data"], "--val", gpu_run["val"], "--device", device, "--no-cache", "--num-workers", "0"]
    return one_json(ok(invoke(command, gpu_run["exported"], *args, *extra, "--json")))


@pytest.mark.parametrize("command", ["knn", "probe"])
def test_knn_and_the_probe_on_the_gpu_agree_with_the_cpu(gpu_run, command):
    cpu, gpu = (_evaluate(gpu_run, command, device) for device in ("cpu", gpu_run["device"].type))
    val_images = 32
    if command == "knn":  # the same neighbours but for a near tie on another device's rounding
        assert abs(gpu["top1"] - cpu["top1"]) <= 1 / val_images + 1e-9
        assert gpu["by_k"].keys() == cpu["by_k"].keys()
    else:  # an SGD fit on either device: the same accuracy within a few images
        assert abs(gpu["top1"] - cpu["top1"]) <= 4 / val_images + 1e-9


def test_a_gpu_run_resumes_on_the_cpu(gpu_run, tmp_path):
    """The run goes on on the CPU, without channels-last or compile: how it runs may change on ``--resume``."""
    out = tmp_path / "run"
    for f in gpu_run["out"].rglob("*"):  # a copy: the other tests read the GPU run as it was
        target = out / f.relative_to(gpu_run["out"])
        if f.is_file() and f.name != ".lock":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())
    result = one_json(ok(invoke(
        "pretrain", "--out", out, "--resume", "--extend-to", "3", "--device", "cpu",
        "--set", "train.compile=false", "--set", "train.channels_last=false", "--json",
    )))  # fmt: skip
    assert result["epochs"] == 3 and math.isfinite(result["loss"])
    ckpt = read_checkpoint(out / "checkpoints/last.safetensors")
    assert ckpt.meta["epoch"] == 3 and ckpt.meta["recipe"]["train"]["device"] == "cpu"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "epoch" in r][-3:] == [1, 2, 3]
