"""A grid of image patches, and the image feature an encoder gives through it: the mean of its pooled patch features.

CPC v2 [0] trains its encoder on patches: each image is cut into a grid of overlapping square patches (``patch``
pixels, ``stride`` apart; the paper's 7x7 grid of 64 px patches at stride 32 from 256 px) and each patch goes through
the encoder alone. Its linear evaluation [0, Sec. 4.2] reads an image the same way: the grid cut from the
un-augmented image, each patch through the encoder, the encoder's pooled patch features averaged over the grid.
``PatchGridFeatures(encoder, patch, stride)`` is that readout as a module with timm's interface (``num_features``,
``forward_features``: the B x F x Gh x Gw grid of patch features, ``forward_head``: their mean, ``forward``: both).

Other input sizes: the patches keep their size and stride (the scale the encoder was trained on), and the grid has as
many rows and columns as fit: Gh x Gw for an H x W input. A side that such a grid does not cover exactly (``side !=
patch + n * stride``) is an error, never a silently cropped border.

[0] CPC v2, Henaff et al. 2019, "Data-Efficient Image Recognition with Contrastive Predictive Coding",
    arXiv:1905.09272.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

READOUT = "patch_grid"
"""The ``type`` of the readout description (``PatchGridFeatures.readout()``) that files record."""


def grid_size(size: int, patch: int, stride: int) -> int:
    """Patches per side of a ``size`` x ``size`` image (0 when the patch does not fit or the grid does not tile it)."""
    if patch > size or (size - patch) % stride:
        return 0
    return (size - patch) // stride + 1


def half_overlap(size: int, grid: int) -> tuple[int, int]:
    """(patch, stride) of a ``grid`` x ``grid`` grid of half-overlapping patches over ``size`` pixels: stride
    ``size / (grid + 1)``, patch twice that; a ``ValueError`` when ``grid + 1`` does not divide ``size``."""
    if grid < 1 or size % (grid + 1):
        raise ValueError(f"a {grid}x{grid} grid of half-overlapping patches needs a size divisible by {grid + 1}")
    stride = size // (grid + 1)
    return 2 * stride, stride


def extract_patches(images: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """``B x C x H x W`` images -> ``B x Gh x Gw x C x patch x patch``: patch ``(i, j)`` is
    ``images[:, :, i*stride : i*stride + patch, j*stride : j*stride + patch]``."""
    x = images.unfold(2, patch, stride).unfold(3, patch, stride)  # B x C x Gh x Gw x p x p
    return x.permute(0, 2, 3, 1, 4, 5)


def _check_side(side: int, patch: int, stride: int, what: str) -> int:
    """Patches along one side of the input; an error unless they cover it exactly (TorchScript-compatible)."""
    if side < patch or (side - patch) % stride != 0:
        raise ValueError(
            "PatchGridFeatures: an input " + what + " of " + str(side) + " px is not covered by " + str(patch)
            + " px patches " + str(stride) + " apart; give sides of " + str(patch) + " + n x " + str(stride)
            + " px (e.g. " + str(patch + 2 * stride) + ")"
        )  # fmt: skip
    return (side - patch) // stride + 1


class PatchGridFeatures(nn.Module):
    """An image's feature as CPC v2's linear evaluation reads it: the mean over the patch grid of ``encoder``'s pooled
    feature of each patch (each patch through ``encoder`` alone). ``encoder``: a timm model with ``num_classes=0``
    (output B x F); its weights stay its own (``self.encoder``), so its ``state_dict`` is timm's under
    ``encoder.``."""

    def __init__(self, encoder: nn.Module, patch: int, stride: int) -> None:
        super().__init__()
        if patch < 1 or stride < 1:
            raise ValueError(f"PatchGridFeatures: patch ({patch}) and stride ({stride}) must be positive")
        self.encoder = encoder
        self.patch = int(patch)
        self.stride = int(stride)
        self.num_features = int(encoder.num_features)

    def readout(self) -> dict[str, Any]:
        """What files record of this readout (``ssl_cli.artifacts.readout`` rebuilds it from that)."""
        return {"type": READOUT, "patch": self.patch, "stride": self.stride}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``B x C x H x W`` -> ``B x F x Gh x Gw``: the encoder's pooled feature of each patch, at its grid cell."""
        b, c, h, w = x.shape
        rows = _check_side(h, self.patch, self.stride, "height")
        cols = _check_side(w, self.patch, self.stride, "width")
        patches = extract_patches(x, self.patch, self.stride).reshape(b * rows * cols, c, self.patch, self.patch)
        features = self.encoder(patches)  # (B Gh Gw) x F
        return features.reshape(b, rows, cols, -1).permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """The grid of patch features -> their mean, ``B x F``."""
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def patch_encoder(model: nn.Module) -> nn.Module:
    """The encoder of one patch inside a ``PatchGridFeatures`` (the timm model the weights belong to); any other
    model as it is."""
    return model.encoder if isinstance(model, PatchGridFeatures) else model
