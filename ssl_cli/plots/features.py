"""Backbone features for the pictures: a checkpoint's backbone (or the same architecture with random weights)
over an image set, with the checkpoint's own evaluation preprocessing, as ``ssl knn`` computes them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ssl_cli.data import ImageSet, open_dataset
from ssl_cli.errors import CheckpointError, DataError


@dataclass
class Encoder:
    """A frozen backbone with the preprocessing it was trained with."""

    model: nn.Module
    meta: dict[str, Any]
    device: torch.device
    size: int
    mean: list[float]
    std: list[float]
    random_init: bool = False

    @property
    def name(self) -> str:
        return str(self.meta.get("backbone", {}).get("name", "backbone"))


def load_encoder(
    checkpoint: str | Path, device: str = "auto", random_init: bool = False, output_view: str | None = None
) -> Encoder:
    """The backbone of a training checkpoint or an export; ``random_init``: the same architecture with fresh
    random weights (torch seed 0, as ``ssl knn --random-init``), the baseline a trained backbone must beat;
    ``output_view`` (CMC's encoders): ``"all"`` or one colour view's name, as ``ssl knn --output-view``."""
    from ssl_cli.artifacts.backbone import load_backbone, preprocessing_stats
    from ssl_cli.runtime import resolve_device

    model, meta = load_backbone(checkpoint, with_meta=True, random_init=random_init, output_view=output_view)
    pre = meta.get("preprocessing") or {}
    if "input_size" not in pre:
        raise CheckpointError(f"{checkpoint}: metadata lacks preprocessing.input_size")
    dev = resolve_device(device)
    mean, std = preprocessing_stats(meta)
    return Encoder(model.to(dev).eval(), meta, dev, int(pre["input_size"][-1]), mean, std, random_init)


def open_images(spec: str, flag: str = "--data") -> ImageSet:
    """An image folder (ImageFolder layout gives labels) or a dataset name, as every command opens it."""
    try:
        return open_dataset(spec, role="eval")
    except DataError as e:
        raise DataError(f"{flag}: {e}") from None


def encode(
    encoder: Encoder,
    images: ImageSet,
    batch_size: int = 256,
    num_workers: int | str = "auto",
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features N x D (float32, CPU) and labels N of every image in ``images``, in order."""
    from ssl_cli.augment import eval_transform
    from ssl_cli.eval.features import extract_features, image_loader

    transform = eval_transform(encoder.size, encoder.mean, encoder.std)
    loader = image_loader(images, transform, batch_size, num_workers)
    return extract_features(encoder.model, loader, encoder.device, progress)


def shown_pixels(encoder: Encoder, images: ImageSet, index: int) -> np.ndarray:
    """What the backbone saw of image ``index``: the evaluation crop, uint8 H x W x 3."""
    from ssl_cli.augment import eval_transform

    crop = eval_transform(encoder.size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # pixels in [0, 1], not normalised
    pixels = crop(images.load(index))
    return (pixels * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def image_name(images: ImageSet, index: int) -> str:
    """A path for a file-backed set, ``<set>#<index>`` for an in-memory one (a dataset name, the demo data)."""
    if images.paths is not None:
        return str(images.paths[index])
    return f"{images.name}#{index}"


def class_name(images: ImageSet, index: int) -> str | None:
    label = int(images.labels[index])
    return images.classes[label] if images.classes and 0 <= label < len(images.classes) else None
