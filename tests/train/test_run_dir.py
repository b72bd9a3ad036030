"""The run folder is one run's: locked while a run trains (a second process is refused with one line), released
however the first one ends (kill -9 included), and a refused or failed start leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY_SET, invoke, ok, user_error

from conftest import TINY, write_image_folder
from ssl_cli.config import load_recipe
from ssl_cli.errors import CheckpointError
from ssl_cli.train.pretrain import pretrain
from ssl_cli.train.run_dir import RunLock

HOLD = """
import sys, time
from pathlib import Path
from ssl_cli.train.run_dir import RunLock
with RunLock(Path(sys.argv[1])):
    Path(sys.argv[2]).write_text("held")
    time.sleep(120)
"""


def _holder(folder: Path, tmp_path: Path) -> subprocess.Popen:
    """Another process that holds the run folder's lock (as a training ``ssl pretrain`` does)."""
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(ready)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the lock holder did not start"
        time.sleep(0.05)
    return proc


def _args(data: Path, out: Path) -> list:
    return ["pretrain", "--recipe", "simclr", "--data", data, "--out", out, "--quiet", "--epochs", "1", *TINY_SET]


def test_a_second_process_is_refused_and_a_killed_one_never_blocks(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", per_class=8, classes=4)
    out = tmp_path / "run"
    holder = _holder(out, tmp_path)
    try:
        user_error(invoke(*_args(data, out)), "is in use by another ssl pretrain")
        assert list(out.iterdir()) == []  # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)  # the holder dies without any clean-up
        holder.wait()
    ok(invoke(*_args(data, out)))  # the OS released its lock
    assert (out / "checkpoints" / "last.safetensors").is_file()


def test_the_lock_holds_within_one_process_too(tmp_path: Path) -> None:
    data = str(write_image_folder(tmp_path / "data", per_class=8, classes=4))
    recipe = load_recipe("simclr", [*TINY, ("train.batch_size", 8)])
    with RunLock(tmp_path / "run"):
        with pytest.raises(CheckpointError, match="in use by another ssl pretrain"):
            pretrain(recipe, data, tmp_path / "run")
    pretrain(recipe, data, tmp_path / "run")


def test_a_start_that_fails_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "new"
    user_error(invoke(*_args(tmp_path / "missing", out)), "missing")
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a folder"):
        RunLock(tmp_path / "file").__enter__()
    assert os.path.isfile(tmp_path / "file")
