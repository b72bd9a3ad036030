"""The one atomic writer: a full disk is one line that says what was kept, and the temporary files of writers that
were killed outright are removed by the next write of the same target (never those of a live writer)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_cli.artifacts.atomic import DiskFull, atomic_write, atomic_write_text, is_disk_full
from ssl_cli.artifacts.safetensors_io import atomic_save


def dead_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_temporaries_of_dead_writers_are_removed_by_the_next_write_and_a_live_writers_are_kept(tmp_path) -> None:
    target = tmp_path / "last.safetensors"
    dead, live = dead_pid(), os.getppid()
    stale = tmp_path / f".last.safetensors.{dead}-abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    staging = tmp_path / f".last.safetensors.{dead}-def456.tmp"  # an export's staging folder
    staging.mkdir()
    (staging / "last.safetensors").write_bytes(b"y")
    alive = tmp_path / f".last.safetensors.{live}-ghi789.tmp"
    alive.write_bytes(b"z")
    other = tmp_path / f".other.safetensors.{dead}-jkl000.tmp"  # another target's: not this write's business
    other.write_bytes(b"w")
    atomic_save({"w": torch.ones(2)}, {"epoch": 1}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, alive.name, other.name])


def test_a_temporary_name_carries_the_writers_process_id(tmp_path) -> None:
    seen: list[str] = []
    atomic_write(tmp_path / "a.txt", lambda tmp: (seen.append(tmp.name), tmp.write_text("a")))
    assert seen[0].startswith(f".a.txt.{os.getpid()}-") and seen[0].endswith(".tmp")


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),
        OSError(122, "Disk quota exceeded"),
        RuntimeError("No space left on device"),
    ],
    ids=["enospc", "edquot", "library-text"],
)
def test_a_full_disk_is_one_line_that_says_what_was_kept(tmp_path, error) -> None:
    target = tmp_path / "notes.txt"
    atomic_write_text(target, "before")

    def full(tmp: Path) -> None:
        tmp.write_text("half")
        raise error

    with pytest.raises(DiskFull) as info:
        atomic_write(target, full)
    message = str(info.value)
    assert "no space left on the device" in message and "notes.txt is kept as it was" in message and "\n" not in message
    assert target.read_text() == "before" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_other_errors_are_not_taken_for_a_full_disk() -> None:
    assert not is_disk_full(OSError(13, "Permission denied"))
    assert not is_disk_full(ValueError("bad"))


def test_a_safetensors_file_gets_the_permissions_of_a_plain_open(tmp_path) -> None:
    """safetensors writes its file 0600: checkpoints were hidden from the other users of a shared folder."""
    from ssl_cli.artifacts.atomic import default_mode

    atomic_save({"w": torch.ones(2)}, {}, tmp_path / "a.safetensors")
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == default_mode()
