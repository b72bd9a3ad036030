"""``torchrun --nproc_per_node 2 -m ssl_cli pretrain``: a real 2-process CPU run (gloo), then a resume on one process.

Checks what the equivalence tests cannot: the launcher, one writer (rank 0) for the run folder and the result,
the per-rank share of the data, and a checkpoint that resumes with another number of processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_image_folder
from ssl_cli.artifacts.checkpoint import read_checkpoint

pytestmark = pytest.mark.ddp

ARGS = [
    "pretrain", "--recipe", "simclr", "--backbone", "test_resnet", "--set", "views.*.size=32",
    "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--num-workers", "0",
    "--set", "train.checkpoint_every=1", "--set", "train.sync_batchnorm=true", "--json",
]  # fmt: skip


def run(*cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_two_process_run_then_resume_on_one_process(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", per_class=16, classes=3)  # 48 images: 3 global batches of 16
    out = tmp_path / "run"
    two = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "ssl_cli", *ARGS, "--data", str(data), "--out", str(out), cwd=tmp_path)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    results = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1  # rank 0 alone reports
    assert results[0]["steps"] == 2 * 3  # 48 images / (8 per rank x 2 ranks) per epoch
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    meta = read_checkpoint(out / "checkpoints" / "last.safetensors").meta
    assert meta["world_size"] == 2 and meta["step"] == 6

    # back to the end of epoch 1, then finish on one process: 48 / 8 = 6 steps for the second epoch
    shutil.copy(out / "checkpoints" / "epoch_0001.safetensors", out / "checkpoints" / "last.safetensors")
    one = run("-m", "ssl_cli", *ARGS, "--out", str(out), "--resume", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    result = json.loads(one.stdout)
    # the step counter is the schedule position of one process: epoch 2 starts at 1 x 6 and ends at 12
    assert result["steps"] == 2 * 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert read_checkpoint(out / "checkpoints" / "last.safetensors").meta["world_size"] == 1

    knn = run("-m", "ssl_cli", "knn", str(out / "checkpoints" / "last.safetensors"), "--train", str(data),
              "--val", str(data), "--device", "cpu", "--json", cwd=tmp_path)  # fmt: skip
    assert knn.returncode == 0, knn.stderr[-3000:]
    assert 0.0 <= json.loads(knn.stdout)["top1"] <= 1.0


def test_sigterm_stops_two_processes_at_the_same_step_and_the_resume_is_bit_identical(tmp_path: Path) -> None:
    """SIGTERM to torchrun's process group (a Slurm preemption): both ranks agree on the step to stop at, rank 0
    writes the checkpoint where the run stands (every rank's random stream in it: stochastic depth), and a 2-process
    ``--resume`` ends with the weights of an uninterrupted 2-process run."""
    import signal
    import time

    import torch

    data = write_image_folder(tmp_path / "data", per_class=64, classes=3)  # 192 images: 12 global batches of 16
    args = [*ARGS[: ARGS.index("--json")], "--recipe", "mocov2", "--set", "method.queue_size=32", "--epochs", "3"]
    args += ["--set", "method.shuffle_bn_splits=2", "--set", "train.checkpoint_every_steps=4", "--data", str(data)]
    args += ["--set", "backbone.kwargs.drop_path_rate=0.2"]  # stochastic depth: each rank's own random stream
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ssl_cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cut = subprocess.Popen(
        [sys.executable, *launch, *args, "--out", str(tmp_path / "cut")],
        cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    last, deadline = tmp_path / "cut/checkpoints/last.safetensors", time.monotonic() + 240
    while _saved_step(last) < 16 and time.monotonic() < deadline:  # the mid-epoch save at step 16 of 12..24
        time.sleep(0.01)
    os.killpg(cut.pid, signal.SIGTERM)
    _, stderr = cut.communicate(timeout=120)
    assert "error: stopped by SIGTERM in epoch 2" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr.split("stopped by SIGTERM")[0], stderr[-3000:]
    meta = read_checkpoint(last).meta
    assert meta["epoch"] == 1 and meta["epoch_step"] > 4 and "rng.rank1.torch" in read_checkpoint(last).tensors
    resumed = run(*launch, *args, "--out", str(tmp_path / "cut"), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = run(*launch, *args, "--out", str(tmp_path / "full"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    a = read_checkpoint(tmp_path / "full/checkpoints/last.safetensors")
    b = read_checkpoint(tmp_path / "cut/checkpoints/last.safetensors")
    assert a.meta["step"] == b.meta["step"] == 36
    for key, value in a.section("model").items():
        assert torch.equal(value, b.section("model")[key]), key


def _saved_step(path: Path) -> int:
    """The global step of a checkpoint (its header only), -1 while there is none."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.metadata()["step"])
    except Exception:  # noqa: BLE001 - not written yet, or being replaced
        return -1
