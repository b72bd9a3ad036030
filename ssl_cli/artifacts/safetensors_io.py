"""safetensors files with JSON metadata: the one atomic writer and the one reader of every ``ssl`` artifact.

Nothing in these files is pickled or executed on load. A write goes to a temporary file beside the target that
replaces it in one ``os.replace``: an interrupted write never leaves a broken file behind, and a failed one leaves
no temporary file. Every file written carries a hash of its tensors (``ssl_cli.artifacts.integrity``), checked
here on every read: a file whose weights changed after writing is refused, never used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ssl_cli.artifacts.atomic import atomic_write
from ssl_cli.artifacts.integrity import HASH_KEY, tensors_sha256, verify_tensors
from ssl_cli.errors import CheckpointError


def atomic_save(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> None:
    """Write a safetensors file atomically; metadata values that are not strings are stored as JSON, and
    ``tensors_sha256`` is the hash of the tensors written (any such key in ``meta`` is replaced)."""
    flat = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    # safetensors refuses shared or strided storage: give it compact CPU copies
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    flat[HASH_KEY] = tensors_sha256(data)
    atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=flat))


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors and metadata (JSON values decoded) of any safetensors file, with one-line errors.

    A file that records ``tensors_sha256`` is checked against it (a mismatch is a ``CheckpointError``); the key
    itself is not in the metadata returned."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    verify_tensors(path, raw, tensors)
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        if k == HASH_KEY:
            continue
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta
