"""Class-balanced labeled subsets of a train set, saved as JSON so that a run can be repeated on the same images.

SimCLR v2 [0, Sec. 4] evaluates semi-supervised learning by fine-tuning on 1% and 10% of ImageNet's labels, using
fixed class-balanced subsets (the ones of [1]) so that methods are compared on the same labeled images. This module
draws such a subset for any labeled ``ImageSet`` and stores it:

- ``select_subset``: every class contributes ``round(F x its size)`` images (half rounds up), at least one. With
  classes of equal size (CIFAR-10: 5,000 each) that is the same count for every class; with unequal classes every
  class keeps the same fraction, as in the ImageNet 1% / 10% subsets. The images of a class are taken in the order
  of a random permutation of that class seeded by ``(seed, class index)``: the subset is a pure function of
  (file list, F, seed), and for one seed the 1% subset is contained in the 10% subset.
- ``image_keys``: an image is named by its path relative to the ``--train`` folder (``cat/0001.jpg``); images of a
  named dataset without files (``cifar10``, ``demo``) by their position in it (``#123``).
- ``save_subset`` / ``read_subset``: a JSON file ``{"format", "data", "data_path", "fraction", "seed",
  "num_images", "classes": {class name: [keys, ...]}}``; ``subset_indices`` finds a saved subset's images in a
  train set again, by name, and fails on any image that is not there.

[0] Big Self-Supervised Models are Strong Semi-Supervised Learners (SimCLR v2), Chen et al. 2020, arXiv:2006.10029.
[1] S4L: Self-Supervised Semi-Supervised Learning, Zhai et al. 2019, arXiv:1905.03670.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ssl_cli.artifacts.atomic import atomic_write_text
from ssl_cli.data import ImageSet
from ssl_cli.data.loader import mix_seed
from ssl_cli.errors import DataError

SUBSET_FORMAT = "ssl-label-subset/1"
SUBSET_FILE = "label_subset.json"
"""Name of the subset file ``ssl transfer --label-fraction`` writes into its ``--out`` folder."""


@dataclass
class LabelSubset:
    """A saved labeled subset: the images of every class, by key (see ``image_keys``)."""

    classes: dict[str, list[str]]
    fraction: float | None
    seed: int | None
    data: str = ""
    data_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return sum(len(keys) for keys in self.classes.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SUBSET_FORMAT,
            "data": self.data,
            "data_path": self.data_path,
            "fraction": self.fraction,
            "seed": self.seed,
            "num_images": self.num_images,
            "rule": "per class round(fraction x class size), half up, at least 1; seeded permutation per class",
            **self.extra,
            "classes": self.classes,
        }


def check_fraction(fraction: float) -> None:
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0 < fraction <= 1):
        raise DataError(f"--label-fraction {fraction}: must be in (0, 1], e.g. 0.01 or 0.1 (1% or 10% of the labels)")


def per_class_count(fraction: float, class_size: int) -> int:
    """``round(fraction * class_size)`` with halves rounded up, at least 1 (0 for an empty class)."""
    if class_size <= 0:
        return 0
    return min(class_size, max(1, math.floor(fraction * class_size + 0.5)))


def select_subset(labels: Tensor, num_classes: int, fraction: float, seed: int) -> Tensor:
    """Indices (sorted) of a class-balanced subset: ``per_class_count(fraction, size)`` images of every class.

    Class ``c``'s images are taken in the order of ``randperm`` seeded by ``mix_seed(seed, c)``, so the result
    depends only on the labels (the file list), ``fraction`` and ``seed``; a smaller fraction with the same seed
    gives a subset of a larger one.
    """
    check_fraction(fraction)
    labels = labels.to("cpu", torch.int64)
    chosen = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        n = per_class_count(fraction, members.numel())
        if n == 0:
            continue
        generator = torch.Generator().manual_seed(mix_seed(seed, c))
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:n]])
    if not chosen:
        raise DataError("the train set has no labeled images to draw a subset from")
    return torch.sort(torch.cat(chosen)).values


def image_keys(images: ImageSet, root: Path | None) -> list[str]:
    """One name per image: its path relative to ``root`` (posix), or ``#index`` for images without files."""
    if images.paths is None or root is None:
        return [f"#{i}" for i in range(len(images))]
    return [Path(p).relative_to(root).as_posix() for p in images.paths]


def subset_from_indices(
    indices: Tensor,
    keys: list[str],
    labels: Tensor,
    classes: list[str],
    fraction: float | None,
    seed: int | None,
    data: str,
    data_path: str | None,
) -> LabelSubset:
    by_class: dict[str, list[str]] = {name: [] for name in classes}
    for i in indices.tolist():
        by_class[classes[int(labels[i])]].append(keys[i])
    return LabelSubset({k: v for k, v in by_class.items() if v}, fraction, seed, data, data_path)


def subset_indices(subset: LabelSubset, keys: list[str], labels: Tensor, classes: list[str], where: str) -> Tensor:
    """The positions of a saved subset's images in a train set (sorted); every listed image must be there.

    ``where`` names the subset file and the train set in error messages.
    """
    position = {key: i for i, key in enumerate(keys)}
    class_index = {name: c for c, name in enumerate(classes)}
    found: list[int] = []
    for name, class_keys in subset.classes.items():
        if name not in class_index:
            raise DataError(
                f"{where}: the subset's class '{name}' is not a class of --train (its classes: "
                f"{', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})"
            )
        for key in class_keys:
            i = position.get(key)
            if i is None:
                raise DataError(f"{where}: the subset lists '{key}' (class '{name}'), which is not in --train")
            if int(labels[i]) != class_index[name]:
                raise DataError(
                    f"{where}: '{key}' is listed under class '{name}' but --train labels it '{classes[int(labels[i])]}'"
                )
            found.append(i)
    if len(set(found)) != len(found):
        raise DataError(f"{where}: the subset lists an image more than once")
    if not found:
        raise DataError(f"{where}: the subset lists no images")
    return torch.tensor(sorted(found), dtype=torch.int64)


def save_subset(subset: LabelSubset, path: Path) -> None:
    """Write the subset file atomically (a temporary file, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(subset.to_dict(), indent=1) + "\n")


def read_subset(path: str | Path) -> LabelSubset:
    """Read a subset file written by ``save_subset``; every problem is one ``DataError`` line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"--label-subset {path}: file not found (write one with --label-fraction F)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"--label-subset {path}: not a readable JSON file ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != SUBSET_FORMAT:
        found = raw.get("format", "missing") if isinstance(raw, dict) else type(raw).__name__
        raise DataError(f"--label-subset {path}: not an ssl label subset (format: {found}; expected {SUBSET_FORMAT})")
    classes = raw.get("classes")
    if not isinstance(classes, dict) or not all(
        isinstance(v, list) and all(isinstance(k, str) for k in v) for v in classes.values()
    ):
        raise DataError(f"--label-subset {path}: 'classes' must map class names to lists of image paths")
    fraction, seed = raw.get("fraction"), raw.get("seed")
    return LabelSubset(classes, fraction, seed, str(raw.get("data", "")), raw.get("data_path"))
