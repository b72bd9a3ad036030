"""AMDIM's encoder as a timm model: ``timm.create_model("amdim_32")`` (also ``amdim_64``, ``amdim_128``).

A residual convolutional network without padding, so its feature maps shrink to exactly 7x7, 5x5 and 1x1 at its
input size, the three scales AMDIM contrasts [0, Sec. 3; 1, model.py ``Encoder``]:

- a stem: 3x3 convolution + ReLU (at 128 px first a 5x5 stride-2 convolution on a 2-pixel reflection padding, the
  only padding of the network);
- residual stages of ``n_depth`` blocks each, widths ``ndf``, ``2 ndf``, ``4 ndf`` (and ``8 ndf`` at 64 and 128 px);
  a block is ``conv kxk (stride s) [-> BN] -> ReLU -> conv 1x1`` plus a shortcut that average-pools the input with
  the same kxk window and stride and pads its channels with zeros; the 1x1 convolution starts at zero (fixup-like),
  so every block starts as its shortcut; no activation after the sum;
- a BatchNorm after the 7x7 stage (only with ``use_bn``), two stages of 3x3 blocks (7 -> 5 -> 3), a last block with
  a 3x3 convolution to ``n_rkhs`` channels (3 -> 1) and a BatchNorm (always on).

The BatchNorms of the blocks are off by default (``use_bn = False``, the reference's ``--use_bn 0``); the reference
builds them anyway and leaves them unused, here they are not built, so every parameter trains. Layer indices and
parameter names follow the reference's ``layer_list``.

The output (``forward``, ``forward_head``) is the 1x1 map flattened: the global features ``r1`` (``n_rkhs`` wide),
on which the paper evaluates its linear classifiers [0, Sec. 4; 1, model.py ``Evaluator``]. ``forward_features``
returns that map before pooling (an average pool, so inputs larger than the design size still give one vector).
``feature_info`` lists every layer of ``layer_list``; ``features_only=True`` returns the 7x7, 5x5 and 1x1 maps.
The 5x5 and 7x7 embeddings of the loss (``RKHSHead``) belong to the method (``ssl_cli.methods.amdim``), as
projection heads do, so an export holds the encoder alone.

Variants (each with the reference's defaults for its input size):

- ``amdim_32``: CIFAR, 32x32; ndf 128, n_rkhs 1024, n_depth 3 (train.py's defaults);
- ``amdim_64``: STL-10, 64x64; ndf 128, n_rkhs 1024, n_depth 3 (train.py's defaults, STL-10 being its default data);
- ``amdim_128``: ImageNet, 128x128; ndf 192, n_rkhs 1536, n_depth 8 (the README's ImageNet command).

``ndf``, ``n_rkhs``, ``n_depth`` and ``use_bn`` are keyword arguments (``backbone.kwargs`` in a recipe).

[0] Learning Representations by Maximizing Mutual Information Across Views (AMDIM), Bachman, Hjelm, Buchwalter 2019,
    arXiv:1906.00910.
[1] Official code, github.com/Philip-Bachman/amdim-public (model.py: Encoder, ConvResNxN, ConvResBlock,
    FakeRKHSConvNet; train.py: defaults; README: the ImageNet command).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ssl_cli.encoders.head import PooledHead

ENCODER_SIZES = (32, 64, 128)
ENCODERS = ("amdim_32", "amdim_64", "amdim_128")
"""The timm names this module registers."""


class ConvReLU(nn.Module):
    """A convolution with a bias, then ReLU; ``pad`` pixels of reflection padding first (the 128 px stem only)."""

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int, pad: int = 0) -> None:
        super().__init__()
        self.pad = pad
        self.conv = nn.Conv2d(n_in, n_out, kernel, stride, 0, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad > 0:
            x = F.pad(x, (self.pad, self.pad, self.pad, self.pad), mode="reflect")
        return F.relu(self.conv(x))


class ResNxN(nn.Module):
    """``conv kxk / s (no bias) [-> BN] -> ReLU -> conv 1x1 (no bias, zero at init)`` plus the shortcut: the input
    average-pooled by the same window and stride, its channels zero-padded to ``n_out`` (reference: ConvResNxN)."""

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int, use_bn: bool = False) -> None:
        super().__init__()
        if n_out < n_in:
            raise ValueError(f"an AMDIM block cannot narrow its input ({n_in} -> {n_out} channels)")
        self.kernel, self.stride, self.extra = kernel, stride, n_out - n_in
        self.conv1 = nn.Conv2d(n_in, n_out, kernel, stride, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(n_out) if use_bn else nn.Identity()
        self.conv2 = nn.Conv2d(n_out, n_out, 1, 1, 0, bias=False)
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv2(F.relu(self.bn1(self.conv1(x))))
        shortcut = x
        if self.kernel > 1 or self.stride > 1:
            shortcut = F.avg_pool2d(x, self.kernel, self.stride, 0)
        if self.extra > 0:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra))
        return residual + shortcut


class ResStage(nn.Module):
    """``depth`` blocks: the first with the stage's window and stride, the others 1x1 (reference: ConvResBlock)."""

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int, depth: int, use_bn: bool) -> None:
        super().__init__()
        blocks = [ResNxN(n_in, n_out, kernel, stride, use_bn)]
        blocks += [ResNxN(n_out, n_out, 1, 1, use_bn) for _ in range(depth - 1)]
        self.layer_list = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_list(x)


class RKHSHead(nn.Module):
    """A 1x1 residual embedding of a feature map into the ``n_out``-wide space the NCE compares in (reference:
    FakeRKHSConvNet): ``conv 1x1 [-> BN] -> ReLU -> conv 1x1 (zero at init)`` plus a 1x1 convolution with a bias as
    shortcut (identity-like at init when it widens: ones on the diagonal, uniform(-0.01, 0.01) elsewhere), then a
    BatchNorm. Takes N x C x H x W maps."""

    def __init__(self, n_in: int, n_out: int, use_bn: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(n_in, n_out, 1, bias=False)
        self.bn_hid = nn.BatchNorm2d(n_out) if use_bn else nn.Identity()
        self.conv2 = nn.Conv2d(n_out, n_out, 1, bias=False)
        self.shortcut = nn.Conv2d(n_in, n_out, 1, bias=True)
        self.bn_out = nn.BatchNorm2d(n_out)
        nn.init.zeros_(self.conv2.weight)
        if n_out >= n_in:
            with torch.no_grad():
                self.shortcut.weight.uniform_(-0.01, 0.01)
                self.shortcut.weight[:, :, 0, 0].diagonal().fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv2(F.relu(self.bn_hid(self.conv1(x))))
        return self.bn_out(residual + self.shortcut(x))


def _layers(encoder_size: int, in_chans: int, ndf: int, n_rkhs: int, depth: int, use_bn: bool) -> list[nn.Module]:
    """The reference's ``layer_list`` for one input size: (module, stride) pairs in order."""
    if encoder_size == 32:
        stem = [ConvReLU(in_chans, ndf, 3, 1), ResNxN(ndf, ndf, 1, 1, use_bn)]
        stages = [(ndf, 2 * ndf, 4), (2 * ndf, 4 * ndf, 2)]
    else:
        stem = [ConvReLU(in_chans, ndf, 5, 2, pad=2), ConvReLU(ndf, ndf, 3, 1)] if encoder_size == 128 else []
        stem = stem or [ConvReLU(in_chans, ndf, 3, 1)]
        stages = [(ndf, 2 * ndf, 4), (2 * ndf, 4 * ndf, 4), (4 * ndf, 8 * ndf, 2)]
    top = stages[-1][1]
    if n_rkhs < top:
        raise ValueError(f"n_rkhs = {n_rkhs} must be at least the last stage's width {top} (ndf = {ndf})")
    return [
        *stem,
        *(ResStage(a, b, k, 2, depth, use_bn) for a, b, k in stages),
        nn.BatchNorm2d(top) if use_bn else nn.Identity(),
        ResStage(top, top, 3, 1, depth, use_bn),
        ResStage(top, top, 3, 1, depth, use_bn),
        ResNxN(top, n_rkhs, 3, 1, use_bn),
        nn.BatchNorm2d(n_rkhs),
    ]


class AMDIMEncoder(PooledHead):
    """AMDIM's encoder with timm's model interface (``num_features``, ``forward_features``, ``forward_head``,
    ``reset_classifier``, ``feature_info``); see the module doc."""

    def __init__(
        self,
        encoder_size: int = 32,
        ndf: int = 128,
        n_rkhs: int = 1024,
        n_depth: int = 3,
        use_bn: bool = False,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if encoder_size not in ENCODER_SIZES:
            raise ValueError(f"encoder_size {encoder_size}: valid are {', '.join(map(str, ENCODER_SIZES))}")
        if min(ndf, n_rkhs, n_depth, in_chans) < 1:
            raise ValueError(f"ndf, n_rkhs, n_depth and in_chans must be positive (got {ndf}, {n_rkhs}, {n_depth})")
        self.encoder_size, self.use_bn = encoder_size, bool(use_bn)
        self.layer_list = nn.Sequential(*_layers(encoder_size, in_chans, ndf, n_rkhs, n_depth, bool(use_bn)))
        self.init_head(n_rkhs, num_classes, global_pool, drop_rate)
        self.feature_info = self._feature_info()

    def _feature_info(self) -> list[dict]:
        info, reduction = [], 1
        for i, layer in enumerate(self.layer_list):
            first = layer.layer_list[0] if isinstance(layer, ResStage) else layer
            conv = getattr(first, "conv", None) or getattr(first, "conv1", None)
            reduction *= conv.stride[0] if isinstance(conv, nn.Conv2d) else 1
            width = info[-1]["num_chs"] if conv is None else conv.out_channels
            info.append({"num_chs": width, "reduction": reduction, "module": f"layer_list.{i}"})
        return info

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^layer_list\.0\.", "blocks": r"^layer_list\.(\d+)"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_list(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> dict:
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (3, size, size),
        "pool_size": None,
        "crop_pct": 1.0 if size <= 64 else 0.875,
        "interpolation": "bicubic",
        "mean": mean,
        "std": std,
        "first_conv": "layer_list.0.conv",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:1906.00910",
        "origin_url": "https://github.com/Philip-Bachman/amdim-public",
    }


# The reference's normalisation per data set (datasets.py): CIFAR, STL-10, ImageNet
_CIFAR_MEAN, _CIFAR_STD = (125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)
default_cfgs = generate_default_cfgs(
    {
        "amdim_32": _cfg(32, _CIFAR_MEAN, _CIFAR_STD),
        "amdim_64": _cfg(64, (0.43, 0.42, 0.39), (0.27, 0.26, 0.27)),
        "amdim_128": _cfg(128, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    }
)


def _create(variant: str, pretrained: bool, encoder_size: int, defaults: dict, kwargs: dict) -> AMDIMEncoder:
    if "encoder_size" in kwargs:
        raise TypeError(f"{variant} is the {encoder_size}x{encoder_size} encoder; for another input size use one of "
                        f"{', '.join(ENCODERS)}")  # fmt: skip
    # features_only: the 7x7, 5x5 and 1x1 maps at the design size (layers 4, 5 and 8; one later at 128 px, whose
    # stem has an extra layer)
    shift = 1 if encoder_size == 128 else 0
    feature_cfg = {"flatten_sequential": True, "out_indices": tuple(i + shift for i in (4, 5, 8))}
    kwargs = {"encoder_size": encoder_size, **defaults, **kwargs}
    return build_model_with_cfg(AMDIMEncoder, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


@register_model
def amdim_32(pretrained: bool = False, **kwargs) -> AMDIMEncoder:
    """AMDIM's 32x32 encoder (CIFAR): ndf 128, n_rkhs 1024, n_depth 3."""
    return _create("amdim_32", pretrained, 32, {"ndf": 128, "n_rkhs": 1024, "n_depth": 3}, kwargs)


@register_model
def amdim_64(pretrained: bool = False, **kwargs) -> AMDIMEncoder:
    """AMDIM's 64x64 encoder (STL-10): ndf 128, n_rkhs 1024, n_depth 3."""
    return _create("amdim_64", pretrained, 64, {"ndf": 128, "n_rkhs": 1024, "n_depth": 3}, kwargs)


@register_model
def amdim_128(pretrained: bool = False, **kwargs) -> AMDIMEncoder:
    """AMDIM's 128x128 encoder (ImageNet): ndf 192, n_rkhs 1536, n_depth 8."""
    return _create("amdim_128", pretrained, 128, {"ndf": 192, "n_rkhs": 1536, "n_depth": 8}, kwargs)
