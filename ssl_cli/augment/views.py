"""View pipelines built from a recipe's ``[[views]]`` tables.

Each view is the SimCLR / BYOL augmentation chain, applied to a uint8 3 x H x W tensor:
random resized crop (scale, ratio) -> horizontal flip -> colour jitter with probability p
(brightness = contrast = saturation = 0.8 s, hue = 0.2 s, in random order; each can be set on its own, as BYOL's
0.4 / 0.4 / 0.2 / 0.1) -> grayscale ->
Gaussian blur (kernel 10% of the crop size, sigma uniform in [0.1, 2.0]) -> solarize (threshold 128)
-> float in [0, 1] -> normalise with the recipe's mean / std.

With ``randaugment = "infomin"`` the chain is InfoMin's [2]: ... -> jitter -> blur -> RandAugment
(``ssl_cli.augment.randaugment``) -> grayscale -> solarize -> ...

[0] SimCLR, Chen et al. 2020, arXiv:2002.05709, Appendix A.
[1] BYOL, Grill et al. 2020, arXiv:2006.07733, Table 6 (per-view blur / solarize probabilities).
[2] InfoMin, Tian et al. 2020, arXiv:2005.10243; github.com/HobbitLong/PyContrast datasets/util.py (aug "D").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from ssl_cli.augment.randaugment import RandAugment
from ssl_cli.config.schema import ViewConfig


def blur_kernel_size(size: int) -> int:
    """SimCLR's kernel: 10% of the image side, made odd (23 for 224)."""
    k = max(3, int(0.1 * size))
    return k if k % 2 == 1 else k + 1


def view_transform(view: ViewConfig, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    steps: list[v2.Transform] = list(crop_transform(view).transforms)  # random resized crop, flip
    strengths = view.jitter()
    if view.jitter_prob > 0 and any(strengths.values()):
        jitter = v2.ColorJitter(**strengths)
        steps.append(v2.RandomApply([jitter], p=view.jitter_prob))
    grey = [v2.RandomGrayscale(view.grayscale_prob)] if view.grayscale_prob > 0 else []
    randaugment = view.randaugment != "none"
    if not randaugment:
        steps += grey
    if view.blur_prob > 0:
        blur = v2.GaussianBlur(blur_kernel_size(view.size), sigma=tuple(view.blur_sigma))
        steps.append(v2.RandomApply([blur], p=view.blur_prob))
    if randaugment:  # InfoMin's order: blur, RandAugment, grey
        steps += [RandAugment(view, mean), *grey]
    if view.solarize_prob > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=view.solarize_prob))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


class MultiView:
    """Turns one image into the recipe's list of views (``count`` of each ``[[views]]`` entry, in order)."""

    def __init__(self, views: Sequence[ViewConfig], mean: Sequence[float], std: Sequence[float]) -> None:
        self.transforms = [view_transform(v, mean, std) for v in views for _ in range(v.count)]

    def __len__(self) -> int:
        return len(self.transforms)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [t(image) for t in self.transforms]


def crop_transform(view: ViewConfig) -> v2.Compose:
    """The geometric start of ``view_transform``: random resized crop (antialiased) and horizontal flip, uint8 in and
    out. ``data.augment = "crop"`` runs it per image in the loader workers; ``BatchedView.finish`` does the rest on the
    training device in whole batches."""
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(view.size, scale=tuple(view.scale), ratio=tuple(view.ratio), antialias=True),
    ]
    if view.hflip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(view.hflip_prob))
    return v2.Compose(steps)


class CropMultiView:
    """One image into its uint8 crops, one per view of the recipe (``count`` of each ``[[views]]`` entry)."""

    def __init__(self, views: Sequence[ViewConfig]) -> None:
        self.transforms = [crop_transform(v) for v in views for _ in range(v.count)]

    def __len__(self) -> int:
        return len(self.transforms)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [t(image) for t in self.transforms]


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Deterministic evaluation preprocessing: resize the short side and centre-crop to ``size``.

    Images already ``size`` pixels on the short side are only cropped (CIFAR stays untouched); larger
    ones follow the ImageNet protocol of resizing to size / 0.875 first.
    """
    return v2.Compose(
        [
            _ResizeIfNeeded(size),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def train_eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """The linear-probe training augmentation: random resized crop and horizontal flip."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


class _ResizeIfNeeded(torch.nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.resize = v2.Resize(int(round(size / 0.875)), antialias=True)
        self.exact = v2.Resize(size, antialias=True)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        short = min(image.shape[-2:])
        if short == self.size:
            return image
        return self.resize(image) if short > self.size / 0.875 else self.exact(image)
