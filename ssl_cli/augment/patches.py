"""CPC v2's patch grid and per-patch augmentation, on the training device.

Each image becomes an overlapping grid of square patches (``patch`` pixels, ``stride`` apart), and each patch is
augmented on its own: a horizontal flip and "colour dropping", which keeps one of the three colour channels at random
and sets the other two to 0 (the data mean, after normalisation) [0, Sec. 4.1 "patch-based augmentation"].

The grid itself (``grid_size``, ``extract_patches``) lives with the encoders (``ssl_cli.encoders.patch_grid``), which
read an image's feature from the same grid at evaluation; it is re-exported here.

[0] CPC v2, Henaff et al. 2019, "Data-Efficient Image Recognition with Contrastive Predictive Coding",
    arXiv:1905.09272.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssl_cli.encoders.patch_grid import extract_patches, grid_size

__all__ = [
    "PatchDraws",
    "apply_patch_augmentation",
    "draw_patch_augmentation",
    "extract_patches",
    "grid_size",
]


@dataclass(frozen=True)
class PatchDraws:
    """Per-patch augmentation decisions, each tensor of one shape: ``flip`` (bool), ``drop`` (bool: keep one channel
    only), ``keep`` (the channel kept when dropping, 0-2)."""

    flip: torch.Tensor
    drop: torch.Tensor
    keep: torch.Tensor


def draw_patch_augmentation(
    shape: tuple[int, ...], hflip_prob: float, color_drop_prob: float, generator: torch.Generator | None = None
) -> PatchDraws:
    """One draw per patch, ``shape`` of them (e.g. images x patches of the global batch): flip with ``hflip_prob``,
    drop two of three channels with ``color_drop_prob``, keeping a channel drawn uniformly (on the CPU; ``generator``:
    the default RNG if None)."""
    flip = torch.rand(shape, generator=generator) < hflip_prob
    drop = torch.rand(shape, generator=generator) < color_drop_prob
    keep = torch.randint(0, 3, shape, generator=generator)
    return PatchDraws(flip, drop, keep)


def apply_patch_augmentation(patches: torch.Tensor, draws: PatchDraws) -> torch.Tensor:
    """``M x C x p x p`` patches with draw ``i`` applied to patch ``i`` (the draws flattened to M, moved to the
    patches' device); colour dropping only for 3-channel patches."""
    m, c = patches.shape[:2]
    flip, drop, keep = (t.reshape(m).to(patches.device) for t in (draws.flip, draws.drop, draws.keep))
    patches = torch.where(flip[:, None, None, None], patches.flip(-1), patches)
    if c == 3:
        channel_mask = torch.nn.functional.one_hot(keep, 3).to(patches.dtype)  # M x 3: the channel kept
        mask = torch.where(drop[:, None], channel_mask, torch.ones_like(channel_mask))
        patches = patches * mask[:, :, None, None]
    return patches
