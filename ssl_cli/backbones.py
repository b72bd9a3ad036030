"""Backbones: where the timm models for training and evaluation are built.

Every backbone is ``timm.create_model(name, num_classes=0, ...)``: it returns pooled features of size
``model.num_features`` and its ``state_dict`` keys are timm's own, so exported weights load straight into
timm. Two changes are supported on top of a stock model:

- ``small_stem`` (ResNets on 32x32 images): the first convolution becomes 3x3 stride 1 and the max-pool is
  removed, as in SimCLR's CIFAR-10 experiments [0] (in each network of an encoder made of several: CMC's). State-dict
  keys stay the same; ``conv1.weight`` changes shape, so such weights are rebuilt with ``ssl_cli.load_backbone``.
- ``freeze_patch_embed`` (ViTs): the random patch projection is kept frozen, the stabiliser of MoCo v3 [1];
  ``pos_embed = "sincos"`` and ``weight_init = "mocov3"`` give the rest of MoCo v3's ViT (a fixed 2-D sin-cos
  position embedding, xavier-uniform init with the patch projection's own fan rule) through timm's model, so
  the weights still load into a stock timm ViT of the same shape.
- ``norm = "groupnorm_ws"`` (CNNs): every BatchNorm2d becomes a GroupNorm with 32 groups and every Conv2d a
  weight-standardised convolution (timm's ``StdConv2d``), so the encoder uses no batch statistics [2, 3].
  Parameter names stay timm's; the BN running statistics disappear, so ``ssl_cli.load_backbone`` rebuilds it.

[0] SimCLR, Chen et al. 2020, arXiv:2002.05709, Appendix B.9.
[1] MoCo v3, Chen, Xie, He 2021, arXiv:2104.02057, Sec. 4; official code facebookresearch/moco-v3 (vits.py).
[2] BYOL works even without batch statistics, Richemond et al. 2020, arXiv:2010.10241.
[3] Weight Standardization, Qiao et al. 2019, arXiv:1903.10520; Group Normalization, Wu & He 2018.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import timm
import torch
from timm.layers import StdConv2d
from torch import nn

import ssl_cli.encoders  # noqa: F401  (registers ssl's own encoders, e.g. AMDIM's, with timm)
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
    if cfg.weight_init == "mocov3":
        kwargs["weight_init"] = "moco"  # timm's MoCo v3 init of the linear layers; the patch projection: below
    return kwargs


def _apply_small_stem(model: nn.Module, name: str) -> None:
    # an encoder made of several networks (CMC's, one per view: ``ssl_cli.encoders.cmc``) changes each one's stem
    for network in getattr(model, "branches", None) or [model]:
        _small_stem(network, name)


def _small_stem(model: nn.Module, name: str) -> None:
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


def sincos_2d(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's fixed position embedding, ``(grid_h * grid_w) x dim`` in row-major patch order.

    A quarter of the channels each: sin and cos of the patch's column times frequencies ``1 / T^(i / (dim/4))``,
    then sin and cos of its row [1, vits.py ``build_2d_sincos_position_embedding``].
    """
    if dim % 4:
        raise RecipeError(f"backbone.pos_embed: 'sincos' needs an embedding width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    w = cols.flatten().double()[:, None] * omega[None]
    h = rows.flatten().double()[:, None] * omega[None]
    return torch.cat([w.sin(), w.cos(), h.sin(), h.cos()], dim=1).float()


def _vit_parts(model: nn.Module, key: str) -> tuple[nn.Module, nn.Conv2d]:
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if not isinstance(proj, nn.Conv2d) or getattr(model, "pos_embed", None) is None:
        raise RecipeError(f"backbone.{key}: '{type(model).__name__}' is not a ViT with a patch projection")
    return model, proj


def apply_sincos_pos_embed(model: nn.Module) -> None:
    """Overwrite a timm ViT's learned position embedding with the fixed 2-D sin-cos one (prefix tokens get 0)."""
    model, _ = _vit_parts(model, "pos_embed")
    grid_h, grid_w = model.patch_embed.grid_size
    pos = model.pos_embed
    prefix = pos.shape[1] - grid_h * grid_w
    table = torch.cat([torch.zeros(prefix, pos.shape[2]), sincos_2d(grid_h, grid_w, pos.shape[2])])
    with torch.no_grad():
        pos.copy_(table[None])
    pos.requires_grad_(False)


def init_patch_embed_mocov3(model: nn.Module) -> None:
    """The patch projection as MoCo v3 initialises it: uniform(+-sqrt(6 / (fan_in + fan_out))) with the fan-in of the
    flattened ``3 x p x p`` patch and the fan-out ``dim`` (xavier for the equivalent linear layer), bias 0."""
    _, proj = _vit_parts(model, "weight_init")
    fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    bound = math.sqrt(6.0 / float(fan_in + proj.out_channels))
    with torch.no_grad():
        proj.weight.uniform_(-bound, bound)
        if proj.bias is not None:
            proj.bias.zero_()


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """Create the timm model for a recipe's ``[backbone]`` section."""
    if not timm.is_model(cfg.name):
        close = timm.list_models(f"*{cfg.name}*")[:8] or difflib.get_close_matches(cfg.name, timm.list_models(), n=8)
        hint = f"; similar: {', '.join(close)}" if close else "; see timm.list_models()"
        raise RecipeError(f"backbone.name: unknown timm model {cfg.name!r}{hint}")
    try:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=0, **timm_kwargs(cfg))
    except (TypeError, ValueError) as e:
        raise RecipeError(f"backbone: timm cannot build {cfg.name!r} with these options: {e}") from None
    if cfg.small_stem:
        _apply_small_stem(model, cfg.name)
    if cfg.norm == "groupnorm_ws":
        apply_groupnorm_ws(model, cfg.name)
    if cfg.weight_init == "mocov3":
        init_patch_embed_mocov3(model)
    if cfg.pos_embed == "sincos":
        apply_sincos_pos_embed(model)
    if cfg.freeze_patch_embed:
        params = patch_embed_params(model)
        if not params:
            raise RecipeError(f"backbone.freeze_patch_embed: '{cfg.name}' has no ViT patch projection")
        for p in params:
            p.requires_grad_(False)
    return model


def check_view_sizes(model: nn.Module, sizes: list[int]) -> None:
    """A ViT takes the views' sizes: its own ``img_size``, or with ``dynamic_img_size`` any multiple of the patch
    size. Checked before training (timm would stop the first step with an ``AssertionError``)."""
    embed = getattr(model, "patch_embed", None)
    grid, patch = getattr(embed, "img_size", None), getattr(embed, "patch_size", None)
    if grid is None or patch is None:
        return
    dynamic = bool(getattr(model, "dynamic_img_size", False) or getattr(embed, "dynamic_img_pad", False))
    for i, size in enumerate(sizes):
        if dynamic and (size % patch[0] or size % patch[1]):
            raise RecipeError(
                f"views.{i}.size: {size} is not a multiple of the ViT's patch size {patch[0]}; valid: "
                f"{', '.join(str(patch[0] * k) for k in range(1, 5))}, ..."
            )
        if not dynamic and (size, size) != tuple(grid):
            raise RecipeError(
                f"views.{i}.size: {size} does not fit the ViT, built for {grid[0]}x{grid[1]}; set backbone.img_size = "
                f"{size}, or backbone.dynamic_img_size = true for views of several sizes"
            )
