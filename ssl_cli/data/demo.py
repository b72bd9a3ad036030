"""The built-in demo dataset: small labeled images generated on the fly (no download, no files).

Ten classes of coarse shapes (disc, square, triangle, ring, cross, horizontal stripes, vertical
stripes, checkerboard, diamond, square frame), each drawn at a random position and size, in a random colour on a
random background with noise. Colour carries no label information, so a method has to learn shape to
separate the classes: kNN on a trained encoder beats kNN on a random one, which is what the demo shows.
"""

from __future__ import annotations

import math

import torch

CLASSES = (
    "disc",
    "square",
    "triangle",
    "ring",
    "cross",
    "hstripes",
    "vstripes",
    "checker",
    "diamond",
    "dots",
)
SPLIT_SIZES = {"train": 2560, "test": 1000}
SPLIT_SEEDS = {"train": 1234, "test": 5678}


def _masks(label: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Shape masks in [0, 1], Nx1xHxW; dx, dy are offsets from each shape's centre in units of its radius."""
    u, v = dx / r, dy / r
    dist = torch.sqrt(u**2 + v**2)
    inside = (u.abs() <= 1) & (v.abs() <= 1)
    period = 2 / 3  # three bands across a shape: coarse enough to survive a 4x stem at 32x32
    shapes = [
        dist <= 1,  # disc
        inside,  # square
        (v <= 0.8) & (v >= 2 * u.abs() - 1.0),  # triangle (apex up)
        (dist <= 1) & (dist >= 0.55),  # ring
        ((u.abs() <= 0.33) | (v.abs() <= 0.33)) & inside,  # cross
        inside & (torch.remainder(v + 1, period) < period / 2),  # horizontal stripes
        inside & (torch.remainder(u + 1, period) < period / 2),  # vertical stripes
        inside & ((u >= 0) ^ (v >= 0)),  # checkerboard of 2 x 2 cells
        (u.abs() + v.abs()) <= 1,  # diamond
        inside & ((u.abs() >= 0.6) | (v.abs() >= 0.6)),  # square frame
    ]
    stacked = torch.stack(shapes, dim=0).float()  # 10 x N x 1 x H x W
    return stacked[label, torch.arange(label.numel())]


def make_demo(split: str = "train", size: int = 32, num_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate the demo split deterministically.

    Returns:
        images: uint8 tensor, N x 3 x size x size.
        labels: int64 tensor, N (classes balanced, index into ``CLASSES``).
    """
    n = num_images if num_images is not None else SPLIT_SIZES[split]
    g = torch.Generator().manual_seed(SPLIT_SEEDS[split] + size + n)
    label = torch.arange(n) % len(CLASSES)
    label = label[torch.randperm(n, generator=g)]
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    yy, xx = coords.view(1, 1, size, 1), coords.view(1, 1, 1, size)

    def rand(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=g)

    cx, cy = rand(n, 1, 1, 1, low=-0.2, high=0.2), rand(n, 1, 1, 1, low=-0.2, high=0.2)
    r = rand(n, 1, 1, 1, low=0.5, high=0.8)
    angle = rand(n, 1, 1, 1, low=-0.35, high=0.35)  # small rotations keep stripe classes apart
    ca, sa = torch.cos(angle), torch.sin(angle)
    dx, dy = xx - cx, yy - cy
    mask = _masks(label, ca * dx + sa * dy, -sa * dx + ca * dy, r)
    # soften edges a little so the shapes are not pixel-perfect
    mask = torch.nn.functional.avg_pool2d(mask, 3, stride=1, padding=1, count_include_pad=False)

    fg = rand(n, 3, 1, 1)
    bg = rand(n, 3, 1, 1)
    # keep foreground and background apart in brightness so every shape stays visible
    gap = (fg.mean(1, keepdim=True) - bg.mean(1, keepdim=True)).abs()
    fg = torch.where(gap < 0.25, 1.0 - bg, fg)
    grad = rand(n, 1, 1, 1, low=-0.15, high=0.15) * (xx * torch.cos(angle * 9) + yy * math.sin(1.0))
    img = mask * fg + (1 - mask) * (bg + grad) + 0.06 * torch.randn(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), label
