"""Checkpoints are written atomically: to a temporary file in the same folder, then renamed over the target, so
a crash at any point leaves either the old checkpoint or the new one, never a torn or half-written file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import ssl_cli.artifacts.atomic as atomic
import ssl_cli.artifacts.safetensors_io as checkpoint
from ssl_cli.artifacts.safetensors_io import read_safetensors
from ssl_cli.train.checkpoint import save_checkpoint


def _save(path: Path, value: float) -> None:
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
    save_checkpoint(path, model, None, {"epoch": int(value)})


def test_the_file_is_written_elsewhere_in_the_same_folder_then_renamed(tmp_path, monkeypatch) -> None:
    target = tmp_path / "last.safetensors"
    written: list[Path] = []
    renamed: list[tuple[Path, Path]] = []
    real_save, real_replace = checkpoint.save_file, os.replace

    def save_file(data, filename, metadata=None):
        written.append(Path(filename))
        return real_save(data, filename, metadata=metadata)

    def replace(src, dst):
        renamed.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    monkeypatch.setattr(atomic.os, "replace", replace)
    _save(target, 1.0)
    assert len(written) == 1 and written[0] != target and written[0].parent == target.parent  # same filesystem
    assert renamed == [(written[0], target)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]


@pytest.mark.parametrize("crash_in", ["write", "rename"])
def test_a_crash_while_saving_keeps_the_old_checkpoint_whole(tmp_path, monkeypatch, crash_in: str) -> None:
    target = tmp_path / "last.safetensors"
    _save(target, 1.0)
    real_save = checkpoint.save_file

    def crash_after_writing(data, filename, metadata=None):
        real_save(data, filename, metadata=metadata)  # the new bytes are on disk somewhere ...
        raise KeyboardInterrupt  # ... and the process dies before the rename

    def crash_on_rename(src, dst):
        raise OSError(28, "No space left on device")

    if crash_in == "write":
        monkeypatch.setattr(checkpoint, "save_file", crash_after_writing)
    else:
        monkeypatch.setattr(atomic.os, "replace", crash_on_rename)
    with pytest.raises((KeyboardInterrupt, atomic.DiskFull)):  # a full disk: one line, what was kept
        _save(target, 2.0)
    tensors, meta = read_safetensors(target)
    assert meta["epoch"] == 1 and torch.all(tensors["model.weight"] == 1.0)  # the old checkpoint, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]  # no temporary file left behind
