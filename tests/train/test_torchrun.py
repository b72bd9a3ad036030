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
