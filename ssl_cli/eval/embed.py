"""Embeddings of an image folder: the backbone's output for every image (what kNN compares), written to a file.

``embed_folder(checkpoint, data, out)`` writes one of:

- ``out.safetensors``: tensors ``embeddings`` (N x D float32) and ``labels`` (N int64, when the folder has class
  sub-folders); metadata ``format`` (``ssl-embeddings/1``), ``paths`` and ``classes`` (JSON lists), ``checkpoint``,
  ``data``, ``count``, ``dim``;
- ``out.npy``: the N x D float32 array, with ``out.json`` beside it holding the same metadata plus ``labels``
  (a list, or null without class sub-folders).

Paths are relative to the folder, with ``/`` separators, in the folder's sorted order (row i is ``paths[i]``).
Files are written atomically; an existing output is replaced only when it is an earlier ``ssl embed`` output.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_cli.artifacts.atomic import atomic_write, atomic_write_text
from ssl_cli.artifacts.backbone import load_backbone
from ssl_cli.artifacts.safetensors_io import atomic_save
from ssl_cli.data import scan_folder
from ssl_cli.errors import DataError, SSLError
from ssl_cli.eval.cache import FeatureCache, images_fingerprint
from ssl_cli.eval.cache import model_id as cache_model_id
from ssl_cli.eval.features import features_of

EMBED_FORMAT = "ssl-embeddings/1"
SUFFIXES = (".safetensors", ".npy")


def sidecar(out: Path) -> Path:
    """The JSON file beside an ``.npy`` output."""
    return out.with_suffix(".json")


def _is_embed_output(path: Path) -> bool:
    """True if ``path`` is a file an earlier ``ssl embed`` wrote (so replacing it loses nothing else)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return (f.metadata() or {}).get("format") == EMBED_FORMAT
        if path.suffix == ".npy":
            return sidecar(path).is_file() and _is_embed_output(sidecar(path))
        if path.suffix == ".json":
            return json.loads(path.read_text()).get("format") == EMBED_FORMAT
    except Exception:  # noqa: BLE001 - unreadable: not ours
        return False
    return False


def check_output(out: Path, checkpoint: Path, data: Path) -> list[Path]:
    """The files ``out`` will write; one-line errors for a bad suffix or a file that must not be overwritten."""
    if out.suffix not in SUFFIXES:
        raise SSLError(f"--out {out}: the file name must end in .safetensors or .npy (with a .json beside it)")
    files = [out] if out.suffix == ".safetensors" else [out, sidecar(out)]
    data_root = data.resolve()
    for f in files:
        resolved = f.resolve()
        if resolved == checkpoint.resolve():
            raise SSLError(f"--out {out}: {f} is the checkpoint itself; choose another file")
        if resolved == data_root:
            raise SSLError(f"--out {out}: {f} is the --data folder; choose a file")
        if f.is_dir():
            raise SSLError(f"--out {out}: {f} is a folder; give a file name")
        if f.exists() and not _is_embed_output(f):
            raise SSLError(
                f"--out {out}: {f} exists and is not an earlier ssl embed output; choose another name or remove it"
            )
    return files


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:  # through a file: given a path, np.save would append ".npy" to the temporary name
        np.save(f, array, allow_pickle=False)


def write_embeddings(
    out: Path, embeddings: torch.Tensor, labels: torch.Tensor | None, meta: dict[str, Any]
) -> list[Path]:
    """Write ``out`` (.safetensors, or .npy + .json) atomically; returns the files written."""
    meta = {"format": EMBED_FORMAT, **meta}
    if out.suffix == ".safetensors":
        tensors = {"embeddings": embeddings.to(torch.float32)}
        if labels is not None:
            tensors["labels"] = labels.to(torch.int64)
        atomic_save(tensors, meta, out)
        return [out]
    array = embeddings.to(torch.float32).numpy()
    atomic_write(out, lambda tmp: _save_npy(tmp, array))
    side = {**meta, "labels": None if labels is None else labels.tolist()}
    atomic_write_text(sidecar(out), json.dumps(side) + "\n")
    return [out, sidecar(out)]


def embed_folder(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    batch_size: int = 256,
    num_workers: int | str = "auto",
    device: str = "auto",
    cache: FeatureCache | None = None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    output_view: str | None = None,
) -> dict[str, Any]:
    """Embed every image of the folder ``data`` with the checkpoint's backbone and write ``out``; returns a summary.

    ``on_start(n)`` is called with the number of images once the folder is listed (e.g. to size a progress bar).
    ``output_view`` (CMC's encoders): ``"all"`` or one colour view's name, as ``ssl knn --output-view``.
    """
    from ssl_cli.runtime import resolve_device

    checkpoint, root, out = Path(checkpoint).expanduser(), Path(data).expanduser(), Path(out).expanduser()
    if not root.is_dir():
        raise DataError(f"--data {data}: not a folder (ssl embed takes an image folder, with or without class folders)")
    if out.resolve() == root.resolve():
        raise SSLError(f"--out {out} is the --data folder; give a file name ending in .safetensors or .npy")
    check_output(out, checkpoint, root)
    model, meta = load_backbone(checkpoint, with_meta=True, output_view=output_view)
    images = scan_folder(root)
    assert images.paths is not None
    if on_start is not None:
        on_start(len(images))
    images_id = images_fingerprint(images)  # before decoding: the key names the files
    pre = meta["preprocessing"]
    dev = resolve_device(device)
    feats, labels, hit = features_of(
        model.to(dev),
        images,
        size=int(pre["input_size"][-1]),
        mean=pre["mean"],
        std=pre["std"],
        device=dev,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        cache=cache,
        model_id=cache_model_id(checkpoint, meta, output_view=output_view) if cache else None,
        images_id=images_id,
        name="data",
    )
    labeled = images.labeled
    paths = [p.relative_to(root).as_posix() for p in images.paths]
    info = {
        "paths": paths,
        "classes": list(images.classes),
        "checkpoint": str(checkpoint),
        "data": str(root),
        "count": int(feats.shape[0]),
        "dim": int(feats.shape[1]),
        **({"output_view": output_view} if output_view is not None else {}),
    }
    try:
        written = write_embeddings(out, feats, labels if labeled else None, info)
    except OSError as e:
        raise SSLError(f"--out {out}: cannot write ({e.strerror or e})") from None
    return {
        "count": info["count"],
        "dim": info["dim"],
        "files": [str(f) for f in written],
        "checkpoint": str(checkpoint),
        "data": str(root),
        "labeled": labeled,
        "classes": len(images.classes),
        "cached": hit,
        **({"output_view": output_view} if output_view is not None else {}),
    }
