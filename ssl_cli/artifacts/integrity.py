"""A content hash of a safetensors file's tensors, written in its metadata and checked on every read.

The metadata key :data:`HASH_KEY` (``tensors_sha256``) holds the hex SHA-256 over the tensors in sorted name
order, each contributing one JSON line ``["<name>", "<safetensors dtype>", [<shape>]]`` and then its raw
(little-endian) bytes, as the file stores them. The writer (``atomic_save``) hashes the tensors it hands to
safetensors; the reader (``read_safetensors``) hashes the tensors it loaded, against the metadata of the same
opening; ``ssl inspect`` hashes the data section in place (memory-mapped: one pass over the bytes, no tensor
built). Each is one pass over the bytes with no copy. The metadata is not covered: it is validated on its own when
read.

A file without the key (written before ``ssl`` recorded it, or by timm or anyone else) is read as before.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ssl_cli.errors import CheckpointError

HASH_KEY = "tensors_sha256"

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
try:  # safetensors' own table names every dtype it writes (float8, unsigned): the header's spelling
    from safetensors.torch import _TYPES

    _DTYPES.update({dtype: code for code, dtype in _TYPES.items()})
except ImportError:  # pragma: no cover - an older safetensors: the common dtypes above
    pass


def _digest(entries: Iterable[tuple[str, str, list[int], Any]]) -> str:
    """The one definition of the hash: ``(name, dtype code, shape, raw bytes)`` in sorted name order."""
    h = hashlib.sha256()
    for name, dtype, shape, data in entries:
        h.update((json.dumps([name, dtype, [int(s) for s in shape]]) + "\n").encode())
        h.update(data)
    return h.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """The hash of contiguous CPU tensors as safetensors writes them (their bytes viewed in place, not copied)."""
    return _digest(
        (name, _DTYPES.get(t.dtype, str(t.dtype)), list(t.shape), t.reshape(-1).view(torch.uint8).numpy())
        for name, t in sorted(tensors.items())
    )


def _file_hashes(path: Path) -> tuple[str | None, str]:
    """The hash recorded in a safetensors file's header and the hash of its data section, from one memory map of
    one opening of the file (a file replaced meanwhile is never half one, half the other)."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        (n,) = struct.unpack("<Q", mm[:8])
        header = json.loads(mm[8 : 8 + n])
        recorded = (header.get("__metadata__") or {}).get(HASH_KEY)
        return recorded, "" if recorded is None else _digest(_file_entries(mm, header, 8 + n))


def _file_entries(mm: mmap.mmap, header: dict[str, Any], start: int):
    for name in sorted(k for k in header if k != "__metadata__"):
        entry = header[name]
        begin, end = entry["data_offsets"]
        with memoryview(mm) as view, view[start + begin : start + end] as data:  # released before the map closes
            yield name, entry["dtype"], entry["shape"], data


def _check(path: Path, recorded: str | None, actual: str) -> bool:
    if recorded is None:
        return False
    if actual != recorded:
        raise CheckpointError(
            f"{path}: its tensors do not match the {HASH_KEY} recorded when it was written, so the file was corrupted "
            "or edited after writing; use another checkpoint (e.g. an epoch_NNNN.safetensors of the run; to --resume, "
            "copy it to last.safetensors) or write this one again"
        )
    return True


def verify_tensors(path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> bool:
    """Check tensors read from ``path`` against the hash its metadata (read in the same opening) records.

    False when no hash is recorded (an older or foreign file), True when it matches; a mismatch is a one-line
    ``CheckpointError`` naming the file.
    """
    recorded = metadata.get(HASH_KEY)
    return _check(path, recorded, tensors_sha256(tensors)) if recorded is not None else False


def verify_file(path: Path) -> bool:
    """``verify_tensors`` for a file not loaded: its data section hashed in place, no tensor built."""
    try:
        recorded, actual = _file_hashes(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    return _check(path, recorded, actual)
