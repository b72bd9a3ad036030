"""Backbones: where the timm models for training and evaluation are built.

Every backbone is ``timm.create_model(name, num_classes=0, ...)``: it returns pooled features of size
``model.num_features`` and its ``state_dict`` keys are timm's own, so exported weights load straight into
timm. Two changes are supported on top of a stock model:

- ``small_stem`` (ResNets on 32x32 images): the first convolution becomes 3x3 stride 1 and the max-pool is
  removed, as in SimCLR's CIFAR-10 experiments [0]. State-dict keys stay the same; ``conv1.weight`` changes
  shape, so such weights are rebuilt with ``ssl_cli.load_backbone``.
- ``freeze_patch_embed`` (ViTs): the random patch projection is kept frozen, the stabiliser of MoCo v3 [1].
- ``norm = "groupnorm_ws"`` (CNNs): every BatchNorm2d becomes a GroupNorm with 32 groups and every Conv2d a
  weight-standardised convolution (timm's ``StdConv2d``), so the encoder uses no batch statistics [2, 3].
  Parameter names stay timm's; the BN running statistics disappear, so ``ssl_cli.load_backbone`` rebuilds it.

[0] SimCLR, Chen et al. 2020, arXiv:2002.05709, Appendix B.9.
[1] MoCo v3, Chen, Xie, He 2021, arXiv:2104.02057, Sec. 4.
[2] BYOL works even without batch statistics, Richemond et al. 2020, arXiv:2010.10241.
[3] Weight Standardization, Qiao et al. 2019, arXiv:1903.10520; Group Normalization, Wu & He 2018.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import timm
from timm.layers import StdConv2d
from torch import nn

from ssl_cli.config.schema import BackboneConfig
from ssl_cli.errors import RecipeError


def timm_kwargs(cfg: BackboneConfig) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model`` (besides ``num_classes=0``)."""
    kwargs: dict[str, Any] = dict(cfg.kwargs)
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if cfg.dynamic_img_size:
        kwargs["dynamic_img_size"] = True
    return kwargs


def _apply_small_stem(model: nn.Module, name: str) -> None:
    conv1 = getattr(model, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise RecipeError(
            f"backbone.small_stem: '{name}' has no single conv1 + maxpool stem; "
            "small_stem works for ResNets with the default stem (e.g. resnet18, resnet50)"
        )
    model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    # keep timm's metadata honest: the stem no longer downsamples by 4
    if hasattr(model, "feature_info"):
        for info in model.feature_info:
            info["reduction"] = max(1, info.get("reduction", 1) // 4)


def _group_norm(bn: nn.BatchNorm2d, groups: int = 32) -> nn.GroupNorm:
    channels = bn.num_features
    gn = nn.GroupNorm(math.gcd(groups, channels), channels, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        gn.weight.data.copy_(bn.weight.data)  # keeps timm's init, e.g. zero-initialised last norm of a block
        gn.bias.data.copy_(bn.bias.data)
    return gn


def _std_conv(conv: nn.Conv2d) -> StdConv2d:
    std = StdConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        eps=1e-5,
    )
    std.weight.data.copy_(conv.weight.data)
    if conv.bias is not None:
        std.bias.data.copy_(conv.bias.data)
    return std


def apply_groupnorm_ws(model: nn.Module, name: str) -> None:
    """Replace BatchNorm2d by GroupNorm(32) and Conv2d by weight-standardised convolutions, in place."""
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, child_name, _group_norm(child))
                replaced += 1
            elif type(child) is nn.Conv2d:
                setattr(parent, child_name, _std_conv(child))
    if not replaced:
        raise RecipeError(
            f"backbone.norm: '{name}' has no BatchNorm2d layers to replace; groupnorm_ws is for CNNs such as resnet18"
        )


def patch_embed_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of a ViT's patch projection (empty for models without one)."""
    patch_embed = getattr(model, "patch_embed", None)
    proj = getattr(patch_embed, "proj", None)
    return list(proj.parameters()) if isinstance(proj, nn.Module) else []


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """Create the timm model for a recipe's ``[backbone]`` section."""
    if not timm.is_model(cfg.name):
        close = timm.list_models(f"*{cfg.name}*")[:8] or difflib.get_close_matches(cfg.name, timm.list_models(), n=8)
        hint = f"; similar: {', '.join(close)}" if close else "; see timm.list_models()"
        raise RecipeError(f"backbone.name: unknown timm model {cfg.name!r}{hint}")
    try:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=0, **timm_kwargs(cfg))
    except TypeError as e:
        raise RecipeError(f"backbone: timm cannot build {cfg.name!r} with these options: {e}") from None
    if cfg.small_stem:
        _apply_small_stem(model, cfg.name)
    if cfg.norm == "groupnorm_ws":
        apply_groupnorm_ws(model, cfg.name)
    if cfg.freeze_patch_embed:
        params = patch_embed_params(model)
        if not params:
            raise RecipeError(f"backbone.freeze_patch_embed: '{cfg.name}' has no ViT patch projection")
        for p in params:
            p.requires_grad_(False)
    return model
