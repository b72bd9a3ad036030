"""On-disk feature cache: a checkpoint's backbone runs over an image set once, later evaluations read the file.

A cache entry is one safetensors file ``<dir>/<key>.safetensors`` holding ``features`` (N x D float32) and
``labels`` (N int64), written atomically. The key is a SHA-256 over:

- the checkpoint's content (a hash of the file's bytes, not its name), whether ``--random-init`` replaced
  its weights and, when given, ``--output-view`` (CMC: which colour views' networks the features come from);
- the readout, when the features are not the backbone's own output (CPC v2: the patch grid whose features are
  averaged, ``ssl_cli.artifacts.readout``), so they never come from an entry of the same file read another way
  (the whole image, before ``ssl`` read CPC v2 files by their grid);
- the preprocessing: input size, mean and std;
- the image set: for a folder, every image's resolved path, size and modification time, the labels and the
  class names; for images held in memory (demo data, torchvision sets), a hash of the pixels and labels;
- :data:`CACHE_FORMAT` (bumped whenever the extraction itself changes) and timm's version (an architecture
  may change between timm releases).

The directory is ``$XDG_CACHE_HOME/ssl/features`` (``~/.cache/ssl/features`` when unset) unless given.
A file that cannot be read, or that holds another key, other labels or another count, is ignored and rewritten;
a cache that cannot be written is a warning, never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ssl_cli.artifacts.atomic import DiskFull, atomic_write
from ssl_cli.artifacts.backbone import HF_WEIGHTS
from ssl_cli.data import ImageSet
from ssl_cli.errors import CheckpointError, DataError

CACHE_FORMAT = "ssl-features/2"  # 2: images decoded upright (EXIF), float / 32-bit TIFFs scaled
"""Version of the cache entries: part of every key, so a change of the extraction invalidates old entries."""

_DIGESTS: dict[tuple[str, int, int], str] = {}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ssl/features``, or ``~/.cache/ssl/features`` (a relative XDG path is ignored, per the spec)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache"
    return root / "ssl" / "features"


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (remembered per resolved path, size and modification time in this process)."""
    path = Path(path).expanduser().resolve()
    if path.is_dir() and (path / HF_WEIGHTS).is_file():  # an ``ssl export --format hf`` folder: its weights
        path = path / HF_WEIGHTS
    try:
        st = path.stat()
        memo = (str(path), st.st_size, st.st_mtime_ns)
        if memo in _DIGESTS:
            return _DIGESTS[memo]
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def model_id(
    checkpoint: str | Path, meta: dict[str, Any], random_init: bool = False, output_view: str | None = None
) -> dict[str, Any]:
    """What names the features' model in the cache key: the file's SHA-256, ``random_init``, CMC's ``output_view``
    when asked for, and the ``readout`` that ``load_backbone`` recorded in ``meta`` (CPC v2's patch grid)."""
    ident: dict[str, Any] = {"checkpoint_sha256": file_digest(checkpoint), "random_init": bool(random_init)}
    if output_view is not None:  # another view's features are other features of the same file
        ident["output_view"] = output_view
    if meta.get("readout"):  # the same weights read through a patch grid: other features
        ident["readout"] = dict(meta["readout"])
    return ident


def _tensor_bytes(h: Any, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def images_fingerprint(images: ImageSet) -> str:
    """A hash that changes when the set's files (paths, sizes, mtimes), pixels in memory, labels or classes do."""
    h = hashlib.sha256()
    h.update(json.dumps(list(images.classes)).encode())
    _tensor_bytes(h, images.labels.to(torch.int64))
    if images.paths is not None:
        h.update(b"paths")
        folders: dict[str, str] = {}  # resolving each folder once is 4x faster than os.path.realpath per file
        for p in images.paths:
            folder, name = os.path.split(os.fspath(p))
            if folder not in folders:
                folders[folder] = os.path.realpath(folder)
            real = os.path.join(folders[folder], name)
            try:
                st = os.lstat(real)
                if stat.S_ISLNK(st.st_mode):  # a linked file: its target is what is read
                    real = os.path.realpath(real)
                    st = os.stat(real)
            except OSError as e:
                raise DataError(f"cannot read image {p}: {e.strerror or e}") from None
            h.update(f"{real}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    elif isinstance(images.images, Tensor):
        h.update(b"pixels")
        _tensor_bytes(h, images.images)
    elif images.images is not None:
        h.update(b"pixel-list")
        for im in images.images:
            _tensor_bytes(h, im)
    return h.hexdigest()


def feature_key(model_id: dict[str, Any], preprocessing: dict[str, Any], images_id: str) -> str:
    """The cache key (hex SHA-256) of one (model, preprocessing, image set) combination."""
    import timm

    payload = {
        "format": CACHE_FORMAT,
        "timm": timm.__version__,
        "model": model_id,
        "preprocessing": {
            "size": int(preprocessing["size"]),
            "mean": [float(v) for v in preprocessing["mean"]],
            "std": [float(v) for v in preprocessing["std"]],
        },
        "images": images_id,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class FeatureCache:
    """Feature files in ``directory``; ``log`` receives one-line notes (hits, rebuilt entries, write problems)."""

    directory: Path
    log: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).expanduser()

    def note(self, message: str) -> None:
        if self.log is not None:
            self.log(message)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def load(self, key: str, labels: Tensor) -> Tensor | None:
        """The cached features for ``key`` if the file is intact and matches ``labels``; else None (a miss)."""
        path = self.path(key)
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                    raise ValueError(f"holds another entry ({meta.get('format')}, key {meta.get('key', '?')[:12]})")
                features, stored = f.get_tensor("features"), f.get_tensor("labels")
            if features.ndim != 2 or features.dtype != torch.float32 or features.shape[0] != labels.numel():
                raise ValueError(f"features of shape {tuple(features.shape)} for {labels.numel()} images")
            if not torch.equal(stored, labels.to(torch.int64)):
                raise ValueError("labels differ from the image set's")
            if not torch.isfinite(features).all():
                raise ValueError("non-finite values")
        except Exception as e:  # noqa: BLE001 - any unreadable or stale file is a miss, never an error
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.note(f"features: ignoring cache file {path} ({reason}); extracting again")
            return None
        return features

    def save(self, key: str, features: Tensor, labels: Tensor, info: dict[str, Any]) -> Path | None:
        """Write an entry atomically; a failure (read-only folder, full disk) is a note, not an error."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        path = self.path(key)
        tensors = {
            "features": features.detach().to("cpu", torch.float32).contiguous(),
            "labels": labels.detach().to("cpu", torch.int64).contiguous(),
        }
        meta = {"format": CACHE_FORMAT, "key": key, "info": json.dumps(info)}
        try:
            atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        except (OSError, SafetensorError, DiskFull) as e:  # safetensors reports a full disk as its own error
            reason = "No space left on device" if isinstance(e, DiskFull) else None
            reason = reason or getattr(e, "strerror", None) or str(e).strip().splitlines()[-1]
            self.note(f"features: cannot write the cache in {self.directory} ({reason}); not cached")
            return None
        return path
