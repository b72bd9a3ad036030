"""CPC v2's patch grid and per-patch augmentation, on the training device.

Each image becomes an overlapping grid of square patches (``patch`` pixels, ``stride`` apart), and each patch is
augmented on its own: a horizontal flip and "colour dropping", which keeps one of the three colour channels at random
and sets the other two to 0 (the data mean, after normalisation) [0, Sec. 4.1 "patch-based augmentation"].

[0] CPC v2, Henaff et al. 2019, "Data-Efficient Image Recognition with Contrastive Predictive Coding",
    arXiv:1905.09272.
"""

from __future__ import annotations

import torch


def grid_size(size: int, patch: int, stride: int) -> int:
    """Patches per side of a ``size`` x ``size`` image (0 when the patch does not fit or the grid does not tile it)."""
    if patch > size or (size - patch) % stride:
        return 0
    return (size - patch) // stride + 1


def extract_patches(images: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """``B x C x S x S`` images -> ``B x G x G x C x patch x patch``: patch ``(i, j)`` is
    ``images[:, :, i*stride : i*stride + patch, j*stride : j*stride + patch]``."""
    x = images.unfold(2, patch, stride).unfold(3, patch, stride)  # B x C x G x G x p x p
    return x.permute(0, 2, 3, 1, 4, 5)


def augment_patches(
    patches: torch.Tensor, hflip_prob: float, color_drop_prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Flip each patch of ``M x C x p x p`` with ``hflip_prob`` and drop two of its three channels with
    ``color_drop_prob``, each patch drawn on its own (on the patches' device; ``generator``: default RNG if None)."""
    m, c = patches.shape[:2]
    dev = patches.device
    if hflip_prob > 0:
        flip = torch.rand(m, device=dev, generator=generator) < hflip_prob
        patches = torch.where(flip[:, None, None, None], patches.flip(-1), patches)
    if color_drop_prob > 0 and c == 3:
        drop = torch.rand(m, device=dev, generator=generator) < color_drop_prob
        keep = torch.randint(0, 3, (m,), device=dev, generator=generator)
        channel_mask = torch.nn.functional.one_hot(keep, 3).to(patches.dtype)  # M x 3: the channel kept
        mask = torch.where(drop[:, None], channel_mask, torch.ones_like(channel_mask))
        patches = patches * mask[:, :, None, None]
    return patches
