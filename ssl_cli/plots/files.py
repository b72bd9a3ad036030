"""Where a picture goes: a ``.png`` path that is no input of the command, written atomically."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from ssl_cli.artifacts.atomic import atomic_write
from ssl_cli.errors import DataError


def default_out(checkpoint: str | Path, name: str) -> Path:
    """``<run>/<name>`` for a checkpoint in a run folder (``<run>/checkpoints/*.safetensors``), else ``./<name>``."""
    path = Path(checkpoint).expanduser()
    if path.parent.name == "checkpoints":
        return path.parent.parent / name
    return Path(name)


def check_out(out: str | Path, inputs: Iterable[str | Path] = (), folders: Iterable[str | Path] = ()) -> Path:
    """``out`` as a path, after checking it ends in ``.png``, is none of ``inputs`` and lies in none of ``folders``
    (an image folder the command reads: a PNG written there would join the data set)."""
    path = Path(out).expanduser()
    if path.suffix.lower() != ".png":
        raise DataError(f"--out {out}: the picture is a PNG file, so the name must end in .png")
    if path.exists() and not path.is_file():
        raise DataError(f"--out {out} exists and is not a file")
    target = path.resolve()
    for source in inputs:
        if Path(source).expanduser().resolve() == target:
            raise DataError(f"--out {out} is an input of this command ({source}); choose another file")
    for folder in folders:
        root = Path(folder).expanduser()
        if root.is_dir() and target.is_relative_to(root.resolve()):
            raise DataError(f"--out {out} is inside the image folder {folder}, where it would become one of its images")
    return path


def write_atomic(out: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``out``, then move it into place: a reader never sees half a
    picture, and an earlier file of that name survives a failed write."""
    try:
        atomic_write(out, write)
    except OSError as e:
        raise DataError(f"--out {out}: cannot write the picture ({e.strerror or e})") from None
