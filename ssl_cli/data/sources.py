"""Where images come from: a folder, a torchvision dataset by name, or the built-in demo set.

``open_dataset(spec, role)`` understands:

- ``None`` or ``"demo"``: the built-in generated set (``demo:test`` for its test split);
- ``cifar10``, ``cifar100``, ``stl10`` (optionally ``name:split``): torchvision, downloaded into the cache
  folder (``$SSL_DATA_CACHE`` or ``~/.cache/ssl/data``);
- a folder in ImageFolder layout (``root/<class>/.../*.jpg``: labels from the first level of sub-folders)
  or a folder tree of unlabeled images (images directly in the root, at any depth below it).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ssl_cli.data.demo import CLASSES as DEMO_CLASSES
from ssl_cli.data.demo import make_demo
from ssl_cli.data.images import IMAGE_EXTENSIONS, ImageSet
from ssl_cli.errors import DataError

TORCHVISION_SETS = {
    # name: (default split for pretraining/train, default split for evaluation, valid splits)
    "cifar10": ("train", "test", ("train", "test")),
    "cifar100": ("train", "test", ("train", "test")),
    "stl10": ("unlabeled", "test", ("train", "test", "unlabeled", "train+unlabeled")),
}


def cache_dir() -> Path:
    return Path(os.environ.get("SSL_DATA_CACHE", Path.home() / ".cache" / "ssl" / "data")).expanduser()


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def scan_folder(root: Path) -> ImageSet:
    """List a folder's images: ImageFolder layout when the root holds only class folders."""
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    top_images = [p for p in root.iterdir() if p.is_file() and _is_image(p)]
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    if class_dirs and not top_images:
        for label, d in enumerate(class_dirs):
            found = sorted(p for p in d.rglob("*") if p.is_file() and _is_image(p))
            paths += found
            labels += [label] * len(found)
        classes = [d.name for d in class_dirs]
    else:
        paths = sorted(p for p in root.rglob("*") if p.is_file() and _is_image(p))
        labels = [-1] * len(paths)
    if not paths:
        raise DataError(
            f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} files, "
            "in class sub-folders or anywhere below it)"
        )
    return ImageSet(root.name, torch.tensor(labels, dtype=torch.int64), classes, paths=paths)


def _torchvision_set(name: str, split: str) -> ImageSet:
    import numpy as np
    import torchvision

    root = cache_dir()
    try:
        if name == "stl10":
            ds = torchvision.datasets.STL10(str(root), split=split, download=True)
            images = torch.from_numpy(np.ascontiguousarray(ds.data))  # N x 3 x 96 x 96
            labels = torch.as_tensor(ds.labels, dtype=torch.int64)
        else:
            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            ds = cls(str(root), train=(split == "train"), download=True)
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # N x 3 x 32 x 32
            labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    except Exception as e:  # noqa: BLE001 - any download/extract failure becomes one line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"cannot get '{name}' into {root} ({reason}); offline? download it elsewhere into that folder "
            f"(or set SSL_DATA_CACHE), or pass a local image folder with --data / --train / --val"
        ) from None
    classes = list(getattr(ds, "classes", [])) or [str(i) for i in range(int(labels.max()) + 1)]
    return ImageSet(f"{name}:{split}", labels, classes, images=images)


def open_dataset(spec: str | None, role: str = "train") -> ImageSet:
    """Open a dataset by spec; ``role`` is ``train`` (pretraining / training split) or ``eval``."""
    if spec is None or spec.split(":")[0] == "demo":
        split = spec.split(":", 1)[1] if spec and ":" in spec else ("train" if role == "train" else "test")
        if split not in ("train", "test"):
            raise DataError(f"unknown demo split {split!r}; valid: train, test")
        images, labels = make_demo(split)
        return ImageSet(f"demo:{split}", labels, list(DEMO_CLASSES), images=images)
    name, _, split = spec.partition(":")
    if name.lower() in TORCHVISION_SETS and not Path(spec).exists():
        train_split, eval_split, valid = TORCHVISION_SETS[name.lower()]
        split = split or (train_split if role == "train" else eval_split)
        if split not in valid:
            raise DataError(f"unknown split {split!r} for {name}; valid: {', '.join(valid)}")
        return _torchvision_set(name.lower(), split)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"data not found: {spec!r} is neither a folder nor a dataset name "
            f"(valid names: demo, {', '.join(TORCHVISION_SETS)})"
        )
    return scan_folder(path)
