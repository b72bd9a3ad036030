"""Colour spaces for CMC's views: RGB in [0, 1] to CIE Lab, YDbDr or YCbCr on whole batches, with each space's fixed
per-channel normalisation.

The formulas are scikit-image's (``skimage.color.rgb2lab`` / ``rgb2ydbdr`` / ``rgb2ycbcr``), which the official CMC
code applies to every crop (dataset.py ``RGB2Lab``, ``RGB2YDbDr``, ``RGB2YCbCr``) [0, 1]:

- Lab: sRGB companding undone (``((c + 0.055) / 1.055) ^ 2.4`` above 0.04045, ``c / 12.92`` below), the sRGB -> XYZ
  matrix, XYZ divided by the D65 white point (0.95047, 1, 1.08883), then ``f(t) = t ^ (1/3)`` above 0.008856 and
  ``7.787 t + 16/116`` below; ``L = 116 f(Y) - 16``, ``a = 500 (f(X) - f(Y))``, ``b = 200 (f(Y) - f(Z))``.
- YDbDr (SECAM): one matrix, ``Y = 0.299 R + 0.587 G + 0.114 B``, ``Db = -0.45 R - 0.883 G + 1.333 B``,
  ``Dr = -1.333 R + 1.116 G + 0.217 B``.
- YCbCr (ITU-R BT.601, 8-bit ranges): ``Y = 16 + 65.481 R + 128.553 G + 24.966 B``,
  ``Cb = 128 - 37.797 R - 74.203 G + 112 B``, ``Cr = 128 + 112 R - 93.786 G - 18.214 B``.

Normalisation, ``(c - mean) / std`` per channel with fixed constants: Lab as the official code, each channel's range
over the sRGB gamut mapped to [-1, 1] (train_CMC.py: mean ``(lo + hi) / 2``, std ``(hi - lo) / 2`` with L in [0, 100],
a in [-86.183, 98.233], b in [-107.857, 94.478]); YCbCr with the official code's mean / std (train_CMC.py); YDbDr
with those of the same author's CMC in PyContrast (datasets/util.py: mean 0.457, -0.082, -0.052, std 0.500, 1.331,
1.333; the CMC repository has none) [2].

Every operation is elementwise (no matmul), so under bf16 autocast the conversion still runs in its input's fp32.

[0] Contrastive Multiview Coding (CMC), Tian, Krishnan, Isola 2019, arXiv:1906.05849, Sec. 4 ("L and ab channels
    of the Lab colour space"; YDbDr on STL-10).
[1] Official code github.com/HobbitLong/CMC (dataset.py, train_CMC.py ``get_train_loader``).
[2] PyContrast, github.com/HobbitLong/PyContrast (pycontrast/datasets/util.py ``build_transforms``: CMC's YDbDr).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

SRGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
D65_WHITE = (0.95047, 1.0, 1.08883)
YDBDR = ((0.299, 0.587, 0.114), (-0.45, -0.883, 1.333), (-1.333, 1.116, 0.217))
YCBCR = ((65.481, 128.553, 24.966), (-37.797, -74.203, 112.0), (112.0, -93.786, -18.214))
YCBCR_OFFSET = (16.0, 128.0, 128.0)


def _mix(rgb: torch.Tensor, matrix: tuple[tuple[float, ...], ...]) -> list[torch.Tensor]:
    """Each output channel a weighted sum of the N x 3 x H x W input's channels (elementwise products, no matmul)."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    return [w[0] * r + w[1] * g + w[2] * b for w in matrix]


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W sRGB in [0, 1] -> CIE Lab (D65), L in [0, 100]: scikit-image's ``rgb2lab``."""
    rgb = rgb.clamp(0.0, 1.0)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).pow(2.4), rgb / 12.92)
    xyz = [c / w for c, w in zip(_mix(linear, SRGB_TO_XYZ), D65_WHITE, strict=True)]
    fx, fy, fz = (
        torch.where(t > 0.008856, t.clamp_min(0.008856).pow(1.0 / 3.0), 7.787 * t + 16.0 / 116.0) for t in xyz
    )
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def rgb_to_ydbdr(rgb: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W RGB in [0, 1] -> YDbDr: scikit-image's ``rgb2ydbdr``."""
    return torch.stack(_mix(rgb.clamp(0.0, 1.0), YDBDR), dim=1)


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W RGB in [0, 1] -> YCbCr, Y in [16, 235]: scikit-image's ``rgb2ycbcr``."""
    mixed = _mix(rgb.clamp(0.0, 1.0), YCBCR)
    return torch.stack([c + o for c, o in zip(mixed, YCBCR_OFFSET, strict=True)], dim=1)


@dataclass(frozen=True)
class ColourSpace:
    """A colour space: its channel names, the conversion from RGB in [0, 1] and the per-channel mean / std."""

    channels: tuple[str, str, str]
    convert: Callable[[torch.Tensor], torch.Tensor]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_split: str
    """The paper's two views: luminance against chroma."""

    def normalised(self, rgb: torch.Tensor) -> torch.Tensor:
        """N x 3 x H x W RGB in [0, 1] -> the space, each channel ``(c - mean) / std``."""
        out = self.convert(rgb.float())
        mean = out.new_tensor(self.mean).view(1, 3, 1, 1)
        std = out.new_tensor(self.std).view(1, 3, 1, 1)
        return (out - mean) / std


def _range_stats(lo: tuple[float, ...], hi: tuple[float, ...]) -> tuple[tuple, tuple]:
    """The official Lab normalisation rule: each channel's range [lo, hi] onto [-1, 1]."""
    pairs = list(zip(lo, hi, strict=True))
    return tuple((a + b) / 2 for a, b in pairs), tuple((b - a) / 2 for a, b in pairs)


_LAB_STATS = _range_stats((0.0, -86.183, -107.857), (100.0, 98.233, 94.478))
SPACES: dict[str, ColourSpace] = {
    "lab": ColourSpace(("L", "a", "b"), rgb_to_lab, *_LAB_STATS, "L,ab"),
    "ydbdr": ColourSpace(("Y", "Db", "Dr"), rgb_to_ydbdr, (0.457, -0.082, -0.052), (0.500, 1.331, 1.333), "Y,DbDr"),
    "ycbcr": ColourSpace(
        ("Y", "Cb", "Cr"), rgb_to_ycbcr, (116.151, 121.08, 132.342), (109.5, 111.855, 111.964), "Y,CbCr"
    ),
}
"""The spaces by name (``space`` of the CMC encoders)."""


def parse_split(space: str, split: str) -> list[tuple[str, list[int]]]:
    """``split`` ("L,ab", "L,a,b", "Y,DbDr", ...) as (view name, channel indices) per view, in order. Each view is a
    comma-separated run of the space's channel names; every channel belongs to exactly one view. Raises ValueError."""
    if space not in SPACES:
        raise ValueError(f"space {space!r}: valid are {', '.join(SPACES)}")
    names = SPACES[space].channels
    split = SPACES[space].default_split if split == "auto" else split
    views = []
    for view in split.split(","):
        if not view:
            raise ValueError(f"split {split!r}: an empty view")
        rest, channels = view, []
        while rest:
            match = next((n for n in sorted(names, key=len, reverse=True) if rest.startswith(n)), None)
            if match is None:
                raise ValueError(f"split {split!r}: {view!r} is not made of the {space} channels {', '.join(names)}")
            channels.append(names.index(match))
            rest = rest[len(match) :]
        views.append((view, channels))
    used = sorted(c for _, channels in views for c in channels)
    if used != [0, 1, 2] or len(views) < 2:
        raise ValueError(f"split {split!r}: at least 2 views that use each of {', '.join(names)} exactly once")
    return views
