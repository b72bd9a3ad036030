"""The one atomic writer: every file ``ssl`` writes goes to a temporary file beside its target, then into place.

A reader never sees half a file, an earlier file of that name survives a failed write, and a failed write leaves
no temporary file behind. The file gets the permissions a plain ``open(path, "w")`` would give (``mkstemp``'s
0600 would hide checkpoints, pictures and embeddings from the other users of a shared folder).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def default_mode() -> int:
    """The permissions a plain ``open(path, "w")`` gives under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a fresh temporary file beside ``path`` (same folder: same file system), then
    ``os.replace`` it onto ``path``. On any failure, ``write``'s included, the temporary file is removed and the
    exception propagates."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, default_mode())
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
