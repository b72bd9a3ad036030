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


def test_a_disk_too_full_for_one_checkpoint_is_refused_before_training(tmp_path: Path, monkeypatch) -> None:
    import shutil

    data = write_image_folder(tmp_path / "data", per_class=16, classes=2)
    real = shutil.disk_usage
    monkeypatch.setattr("ssl_cli.train.run_dir.shutil.disk_usage", lambda p: real(p)._replace(free=1000))
    line = user_error(
        invoke("pretrain", "--recipe", "simclr", "--data", data, "--out", tmp_path / "run", *TINY_SET),
        "not enough free space in",
        "MiB and a write needs room for two",
    )
    assert "choose another --out" in line
    assert not (tmp_path / "run").exists()  # nothing written, the folder the run made removed again


def test_epoch_checkpoints_beyond_the_free_space_are_a_warning(tmp_path: Path, monkeypatch) -> None:
    import shutil

    from ssl_cli.train.checkpoint import checkpoint_bytes
    from ssl_cli.train.pretrain import build_method

    data = write_image_folder(tmp_path / "data", per_class=8, classes=2)
    recipe = load_recipe("simclr", [*TINY, ("train.batch_size", 8), ("train.epochs", 4), ("train.checkpoint_every", 1)])
    size = checkpoint_bytes(build_method(recipe), recipe.optim.name)
    real = shutil.disk_usage
    monkeypatch.setattr("ssl_cli.train.run_dir.shutil.disk_usage", lambda p: real(p)._replace(free=3 * size))
    lines: list[str] = []

    class Log:
        def start(self, *a, **k): ...
        def update(self, *a, **k): ...
        def epoch_end(self, *a, **k): ...
        def log(self, message: str) -> None:
            lines.append(message)

    pretrain(recipe, str(data), tmp_path / "run", reporter=Log())
    assert any(x.startswith("warning: this run keeps 4 epoch checkpoint(s)") for x in lines), lines


def test_the_checkpoint_size_estimate_is_what_a_checkpoint_holds(tmp_path: Path) -> None:
    """``checkpoint_bytes`` (before the optimizer has state) against the tensors of a real checkpoint after a step."""
    from ssl_cli.artifacts.checkpoint import read_checkpoint
    from ssl_cli.train.checkpoint import checkpoint_bytes
    from ssl_cli.train.pretrain import build_method

    data = write_image_folder(tmp_path / "data", per_class=8, classes=2)
    for optim in ("sgd", "adamw"):
        recipe = load_recipe("simclr", [*TINY, ("train.batch_size", 8), ("optim.name", optim)])
        result = pretrain(recipe, str(data), tmp_path / optim)
        ckpt = read_checkpoint(result.checkpoint)
        held = sum(t.numel() * t.element_size() for k, t in ckpt.tensors.items() if not k.startswith("rng."))
        estimate = checkpoint_bytes(build_method(recipe), optim)
        assert 0.95 * held <= estimate <= 1.05 * held, (optim, estimate, held)


def test_a_full_disk_while_appending_metrics_is_one_line_and_the_run_resumes(tmp_path: Path, monkeypatch) -> None:
    from ssl_cli.artifacts.atomic import DiskFull

    data = str(write_image_folder(tmp_path / "data", per_class=8, classes=2))
    recipe = load_recipe("simclr", [*TINY, ("train.batch_size", 8), ("train.epochs", 2)])
    real_open, calls = Path.open, [0]

    class FullDisk:
        """The second append to metrics.jsonl: half a line reaches the disk, then it is full."""

        def __init__(self, f) -> None:
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

        def write(self, text: str) -> int:
            self.f.write(text[:12])
            raise OSError(28, "No space left on device")

    def open_(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        if self.name == "metrics.jsonl" and mode == "a":
            calls[0] += 1
            if calls[0] == 2:
                return FullDisk(f)
        return f

    monkeypatch.setattr(Path, "open", open_)
    with pytest.raises(DiskFull, match=r"while writing metrics.jsonl: .* then continue the run with: ssl pretrain"):
        pretrain(recipe, data, tmp_path / "run")
    monkeypatch.undo()
    resumed = pretrain(recipe, data, tmp_path / "run", resume=True)  # the torn line dropped, epoch 2 trained again
    assert resumed.epochs == 2
