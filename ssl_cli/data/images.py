"""An ``ImageSet``: images (decoded in memory or read from files on demand) with optional labels."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ssl_cli.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MEMORY_LIMIT_BYTES = 4 * 2**30  # cache = "auto" keeps decoded images in memory below this


class ImageError(DataError):
    """An image file that cannot be read or decoded: which file, and what is wrong with it.

    Raised in a DataLoader worker (``data.cache = "none"``, or a set too large to keep in memory), it comes back to
    the main process as torch re-raises it: ``ImageError("Caught ImageError in DataLoader worker process 0.\n
    Original Traceback (most recent call last): ... ssl_cli.data.images.ImageError: <message>")``. The constructor
    keeps only ``<message>``, so the user sees the one line of what is wrong with which file, not the worker's
    traceback folded into it."""

    def __init__(self, message: str = "") -> None:
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def _grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Single-channel high-range pixels scaled to 0..255 by their type's range (PIL's convert clips instead).

    ``I;16*`` and ``I`` holding 0..65535 (16-bit PNGs and TIFFs open as ``I``): / 257; ``I`` above that (32-bit
    integer TIFFs): by 2^31 - 1, PIL's int32 range; ``F`` (float TIFFs): [0, 1] x 255, [0, 255] as they are, a
    larger range by its own maximum. Negative values become 0."""
    v = values.astype(np.float64)
    top = float(v.max()) if v.size else 0.0
    if mode == "F":
        scale = 255.0 if top <= 1.0 else 1.0 if top <= 255.0 else 255.0 / top
    elif mode.startswith("I;16") or top <= 65535:
        scale = 1.0 / 257.0
    else:
        scale = 255.0 / (2**31 - 1)
    return np.clip(np.round(v * scale), 0, 255).astype(np.uint8)


def decode_image(path: Path) -> torch.Tensor:
    """Read one image file as an RGB uint8 tensor, 3 x H x W, upright as its EXIF orientation says (a phone photo
    shot sideways is turned as a viewer shows it); grey, RGBA, palette, 16-bit, 32-bit and float images converted."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im) or im
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                grey = _grey_to_uint8(np.asarray(im), im.mode)
                array = np.repeat(grey[:, :, None], 3, axis=2)
            else:
                im = im.convert("RGBA").convert("RGB") if im.mode in ("P", "PA", "LA") else im.convert("RGB")
                array = np.asarray(im, dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot decode image {path}: {e}") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass
class ImageSet:
    """A list of images with labels (-1 where unknown).

    Exactly one of ``images`` (decoded, uint8 N x 3 x H x W tensor or list of 3 x H x W tensors) and
    ``paths`` is the source of pixels; ``load(i)`` hides which.
    """

    name: str
    labels: torch.Tensor
    classes: list[str] = field(default_factory=list)
    images: torch.Tensor | Sequence[torch.Tensor] | None = None
    paths: list[Path] | None = None

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def labeled(self) -> bool:
        return bool(self.classes) and bool((self.labels >= 0).all())

    def load(self, index: int) -> torch.Tensor:
        if self.images is not None:
            return self.images[index]
        assert self.paths is not None
        return decode_image(self.paths[index])

    def decoded(self, threads: int | None = None) -> ImageSet:
        """Decode every image once (in parallel threads) and keep the pixels in memory."""
        if self.images is not None or self.paths is None:
            return self
        threads = threads or max(1, os.cpu_count() or 1)
        with ThreadPoolExecutor(threads) as pool:
            images = list(pool.map(decode_image, self.paths, chunksize=256))
        same_size = all(im.shape == images[0].shape for im in images)
        stacked: torch.Tensor | list[torch.Tensor] = torch.stack(images) if same_size else images
        return ImageSet(self.name, self.labels, self.classes, images=stacked)

    def estimated_bytes(self, sample: int = 16) -> int:
        if self.images is not None or not self.paths:
            return 0
        picks = self.paths[:: max(1, len(self.paths) // sample)][:sample]
        sizes = []
        for p in picks:
            try:
                with Image.open(p) as im:
                    sizes.append(im.width * im.height * 3)
            except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
                raise ImageError(f"cannot read image {p}: {e}") from None
        return int(sum(sizes) / len(sizes) * len(self.paths))

    def cached(self, policy: str) -> ImageSet:
        """Apply a ``data.cache`` policy: ``memory`` decodes all, ``auto`` when under 4 GiB, ``none`` never."""
        if policy == "memory" or (policy == "auto" and self.estimated_bytes() < MEMORY_LIMIT_BYTES):
            return self.decoded()
        return self

    def subset(self, indices: torch.Tensor) -> ImageSet:
        idx = indices.tolist()
        images = None
        if isinstance(self.images, torch.Tensor):
            images = self.images[indices]
        elif self.images is not None:
            images = [self.images[i] for i in idx]
        paths = [self.paths[i] for i in idx] if self.paths is not None else None
        return ImageSet(self.name, self.labels[indices], self.classes, images=images, paths=paths)
