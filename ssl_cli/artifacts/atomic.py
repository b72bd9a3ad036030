"""The one atomic writer: every file ``ssl`` writes goes to a temporary file beside its target, then into place.

A reader never sees half a file, an earlier file of that name survives a failed write, and a failed write leaves
no temporary file behind. The file gets the permissions a plain ``open(path, "w")`` would give (``mkstemp``'s
0600 would hide checkpoints, pictures and embeddings from the other users of a shared folder).

A temporary name carries its writer's process id (``.NAME.PID-XXXX.tmp``). A writer killed outright (``kill -9``,
the machine's power) cannot remove its temporary file; the next write of the same target on this machine removes the
temporaries of writers that are no longer alive (``remove_dead_temporaries``), never those of a live one.

A full disk (``ENOSPC``, a quota's ``EDQUOT``; also as the text of safetensors' own error) is one line,
:class:`DiskFull`, that says what was kept.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ssl_cli.errors import CheckpointError

FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskFull(CheckpointError):
    """No space (or quota) left where a file was being written (``path``); nothing was replaced."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


def is_disk_full(error: BaseException) -> bool:
    """An ``OSError`` with ENOSPC / EDQUOT, or another library's error saying so (safetensors' ``SafetensorError``)."""
    if isinstance(error, OSError) and error.errno in FULL_ERRNOS:
        return True
    text = str(error)
    return "No space left on device" in text or "Disk quota exceeded" in text


def disk_full_message(path: Path, then: str = "run the command again") -> str:
    return (
        f"no space left on the device of {path.parent} while writing {path.name}: nothing was replaced (an earlier "
        f"{path.name} is kept as it was); free some space, then {then}"
    )


def default_mode() -> int:
    """The permissions a plain ``open(path, "w")`` gives under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def temporary_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_dead_temporaries(folder: Path, name: str) -> int:
    """Remove the temporary files or folders (``.NAME.PID-XXXX.tmp``) that writers of ``folder / name`` which are no
    longer alive left; returns their number."""
    removed = 0
    for stale in folder.glob(f".{name}.*-*.tmp"):
        pid = stale.name[len(name) + 2 :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        try:
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
            removed += 1
        except OSError:
            pass  # another process removed it first, or it is not ours to remove
    return removed


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a fresh temporary file beside ``path`` (same folder: same file system), then
    ``os.replace`` it onto ``path``. On any failure, ``write``'s included, the temporary file is removed and the
    exception propagates (a full disk as :class:`DiskFull`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, default_mode())  # after the write: a library may replace the file (safetensors makes it 0600)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception) and is_disk_full(e):
            raise DiskFull(disk_full_message(path), path) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
