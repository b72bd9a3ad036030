"""Self-attention maps of a ViT backbone: where the [CLS] token looks in the last block, head by head.

DINO [0, Fig. 1 and its ``visualize_attention.py``] shows that the [CLS] token's attention over the patches in
the last block of a self-supervised ViT often outlines the main object. ``ssl visualize`` draws the same maps
for any checkpoint whose backbone is a timm ViT:

- the last block's attention is read with a forward hook: for that one block, timm's fused
  ``scaled_dot_product_attention`` path is switched off, so the module computes ``softmax(q k^T * scale)``
  explicitly and hands it to ``attn_drop``, whose input the hook records (``last_block_attention``);
- row 0 (the [CLS] token) over the patch tokens, after the ``num_prefix_tokens`` class / register /
  distillation tokens, is reshaped to the patch grid (``cls_attention``);
- each map (every head, and the mean over the heads) is upsampled to the image size by nearest neighbour,
  scaled to [0, 1] on its own and coloured with a built-in viridis-like colour map (no matplotlib);
- ``threshold``: DINO's mask view. The smallest set of patches that holds ``threshold`` of a map's attention
  mass is kept, the rest of the image darkened (``mass_masks``).

One PNG per image: the preprocessed image, one heat map per head, then the mean over heads, side by side
(panels ``GAP`` pixels apart, enlarged ``zoom`` times by nearest neighbour); with ``threshold`` a second row
holds the masked images under their heat maps.

[0] Emerging Properties in Self-Supervised Vision Transformers (DINO), Caron et al. 2021, arXiv:2104.14294.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ssl_cli.data import ImageSet, open_dataset
from ssl_cli.data.images import IMAGE_EXTENSIONS
from ssl_cli.errors import CheckpointError, DataError, SSLError

GAP = 2
"""White pixels between two panels (after zooming)."""
MIN_PANEL = 128
"""The default zoom makes every panel at least this many pixels wide (32x32 CIFAR images: 4x)."""
DARKEN = 0.25
"""Brightness of the pixels outside the kept patches in the threshold view."""
BATCH = 16

# viridis sampled at 0, 1/8, ..., 1 (sRGB); linear interpolation between these anchors
_ANCHORS = np.array(
    [
        [68, 1, 84],
        [72, 40, 120],
        [62, 74, 137],
        [49, 104, 142],
        [38, 130, 142],
        [31, 158, 137],
        [53, 183, 121],
        [109, 205, 89],
        [253, 231, 37],
    ],
    dtype=np.float64,
)


# --- colours and maps -------------------------------------------------------------------------------------


def colorize(values: np.ndarray | torch.Tensor) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB of shape ``(*shape, 3)``, viridis-like (0 dark violet, 1 yellow)."""
    v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    v = np.clip(np.nan_to_num(v.astype(np.float64), nan=0.0), 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.minimum(np.floor(v).astype(np.int64), len(_ANCHORS) - 2)
    frac = (v - lo)[..., None]
    rgb = _ANCHORS[lo] * (1.0 - frac) + _ANCHORS[lo + 1] * frac
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def scale01(maps: torch.Tensor) -> torch.Tensor:
    """Each map (last two dimensions) scaled to [0, 1] on its own; a constant map becomes all zeros."""
    flat = maps.flatten(-2)
    lo = flat.min(-1, keepdim=True).values
    hi = flat.max(-1, keepdim=True).values
    scaled = (flat - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return scaled.reshape(maps.shape)


def mass_masks(attention: torch.Tensor, threshold: float) -> torch.Tensor:
    """DINO's mask: per row of ``attention`` (... x P, non-negative), the fewest entries that together hold
    ``threshold`` of the row's total mass (largest first; the entry that crosses the threshold is kept)."""
    p = attention / attention.sum(-1, keepdim=True).clamp_min(1e-12)
    values, order = p.sort(-1, descending=True)
    mass_before = values.cumsum(-1) - values
    keep_sorted = mass_before < threshold
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def upsample(maps: torch.Tensor, patch: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Grid maps (... x gh x gw) -> image maps (... x H x W): each patch's value over its patch's pixels."""
    up = maps.repeat_interleave(patch[0], -2).repeat_interleave(patch[1], -1)
    if up.shape[-2] >= size[0] and up.shape[-1] >= size[1]:
        return up[..., : size[0], : size[1]]  # padded grids (dynamic_img_pad) reach past the image
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    return torch.nn.functional.interpolate(flat, size=size, mode="nearest").reshape(*maps.shape[:-2], *size)


# --- reading the attention --------------------------------------------------------------------------------


def vit_backbone(model: nn.Module, name: str) -> nn.Module:
    """The timm ViT inside ``model``, checked for what ``last_block_attention`` needs."""
    from ssl_cli.artifacts.backbone import ProjectedBackbone

    if isinstance(model, ProjectedBackbone):  # an export with projector layers: the backbone is inside
        model = model.backbone
    blocks = getattr(model, "blocks", None)
    if not hasattr(model, "patch_embed") or not isinstance(blocks, nn.Sequential | nn.ModuleList) or not len(blocks):
        raise CheckpointError(f"visualize: needs a ViT backbone, the checkpoint has {name}")
    attn = getattr(blocks[-1], "attn", None)
    if attn is None or not hasattr(attn, "fused_attn") or not isinstance(getattr(attn, "attn_drop", None), nn.Module):
        raise CheckpointError(
            f"visualize: cannot read the attention of {name}'s last block (needs timm's ViT Attention module)"
        )
    if getattr(model, "cls_token", None) is None:
        raise CheckpointError(f"visualize: {name} has no [CLS] token (class_token=False), so no attention row to show")
    return model


@torch.no_grad()
def last_block_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The softmaxed self-attention of the last block, B x heads x N x N (N tokens, prefix tokens first).

    For the duration of one forward pass the block's fused attention kernel is switched off, so the module
    computes ``softmax(q k^T * scale)`` itself and passes it to ``attn_drop``; a forward hook records that
    input. The model's outputs are unchanged (same arithmetic, unfused), and the module is restored after.
    """
    attn = model.blocks[-1].attn
    captured: list[torch.Tensor] = []
    handle = attn.attn_drop.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach()))
    fused = attn.fused_attn
    attn.fused_attn = False
    try:
        model.forward_features(x)
    finally:
        attn.fused_attn = fused
        handle.remove()
    if not captured or captured[-1].dim() != 4 or captured[-1].shape[-1] != captured[-1].shape[-2]:
        raise CheckpointError(
            f"visualize: the last block's attention could not be read ({type(attn).__name__} does not compute "
            "it explicitly)"
        )
    return captured[-1].float()


def patch_grid(model: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
    pe = model.patch_embed
    if getattr(model, "dynamic_img_size", False) and hasattr(pe, "dynamic_feat_size"):
        return tuple(int(g) for g in pe.dynamic_feat_size(size))
    return tuple(int(g) for g in pe.grid_size)


def cls_attention(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The [CLS] token's last-block attention to every patch token: B x heads x gh x gw, and (gh, gw).

    Rows are probabilities over all N tokens; the prefix tokens' share is left out, so a map sums to 1 minus
    what [CLS] gives to itself and the register tokens.
    """
    attention = last_block_attention(model, x)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    cls = attention[:, :, 0, prefix:]
    gh, gw = patch_grid(model, tuple(x.shape[-2:]))
    if gh * gw != cls.shape[-1]:
        raise CheckpointError(
            f"visualize: {cls.shape[-1]} patch tokens do not form the {gh} x {gw} patch grid of a "
            f"{x.shape[-2]} x {x.shape[-1]} input"
        )
    return cls.reshape(*cls.shape[:2], gh, gw), (gh, gw)


def set_input_size(model: nn.Module, size: int, name: str) -> None:
    """Make the ViT take ``size`` x ``size`` inputs (position embeddings resampled, as DINO does for other sizes)."""
    pe = model.patch_embed
    ph, pw = (int(p) for p in pe.patch_size)
    if not getattr(pe, "dynamic_img_pad", False) and (size % ph or size % pw):
        raise SSLError(f"--size {size}: must be a multiple of {name}'s patch size {ph}")
    if size < max(ph, pw):
        raise SSLError(f"--size {size}: smaller than {name}'s patch size {ph}")
    if getattr(model, "dynamic_img_size", False) or tuple(pe.img_size or ()) == (size, size):
        return
    if not hasattr(model, "set_input_size"):
        raise SSLError(f"--size {size}: {name} only takes {tuple(pe.img_size)} inputs; leave --size out")
    model.set_input_size(img_size=(size, size))


# --- pictures ---------------------------------------------------------------------------------------------


def render(
    image: torch.Tensor,
    attention: torch.Tensor,
    patch: tuple[int, int],
    threshold: float | None = None,
    zoom: int = 1,
) -> Image.Image:
    """One picture: ``image`` (uint8 3 x H x W), then one heat map per head of ``attention`` (heads x gh x gw),
    then the mean over heads; with ``threshold`` a second row of masked images under the heat maps."""
    size = tuple(image.shape[-2:])
    maps = torch.cat([attention, attention.mean(0, keepdim=True)]).float()  # heads + 1 maps
    heat = colorize(scale01(upsample(maps, patch, size)))  # (heads + 1) x H x W x 3
    picture = image.permute(1, 2, 0).cpu().numpy()
    rows = [[picture, *heat]]
    if threshold is not None:
        keep = mass_masks(maps.flatten(1), threshold).reshape(maps.shape).float()
        keep = upsample(keep, patch, size).cpu().numpy()[..., None]
        masked = np.round(picture[None] * (DARKEN + (1.0 - DARKEN) * keep)).astype(np.uint8)
        rows.append([None, *masked])
    h, w = size[0] * zoom, size[1] * zoom
    cols = len(rows[0])
    canvas = np.full((len(rows) * h + (len(rows) - 1) * GAP, cols * w + (cols - 1) * GAP, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            if panel is None:
                continue
            big = np.repeat(np.repeat(panel, zoom, axis=0), zoom, axis=1)
            canvas[r * (h + GAP) : r * (h + GAP) + h, c * (w + GAP) : c * (w + GAP) + w] = big
    return Image.fromarray(canvas)


def panel_layout(size: int, heads: int, zoom: int, threshold: bool) -> tuple[int, int]:
    """(width, height) of a picture of ``heads`` heads at image size ``size``."""
    cols, rows = heads + 2, 2 if threshold else 1
    return cols * size * zoom + (cols - 1) * GAP, rows * size * zoom + (rows - 1) * GAP


# --- the command ------------------------------------------------------------------------------------------


def default_out_dir(checkpoint: str | Path) -> Path:
    """``<run>/attention`` for a checkpoint in a run folder (``<run>/checkpoints/*.safetensors``), else ./attention."""
    path = Path(checkpoint).expanduser()
    if path.parent.name == "checkpoints":
        return path.parent.parent / "attention"
    return Path("attention")


def open_images(spec: str) -> ImageSet:
    """One image file, or a folder / dataset name as every other command opens it."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"--data {spec}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)})")
        return ImageSet(path.name, torch.tensor([-1]), paths=[path])
    return open_dataset(spec, role="eval")


def _file_name(images: ImageSet, i: int) -> str:
    parts = [f"{i:03d}"]
    label = int(images.labels[i])
    if images.classes and 0 <= label < len(images.classes):
        parts.append(images.classes[label])
    if images.paths is not None:
        parts.append(images.paths[i].stem)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts)) + ".png"


def visualize(
    checkpoint: str | Path,
    data: str,
    num_images: int = 4,
    out: str | Path | None = None,
    size: int | None = None,
    threshold: float | None = None,
    zoom: int | None = None,
    device: str = "auto",
    progress: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Write one attention picture per image for the first ``num_images`` images of ``data``.

    Returns ``images`` (the PNG paths), ``heads``, ``grid`` [gh, gw], and ``out``, ``size``, ``zoom``.
    """
    from ssl_cli.artifacts.backbone import load_backbone, preprocessing_stats
    from ssl_cli.augment import eval_transform
    from ssl_cli.runtime import resolve_device

    if num_images < 1:
        raise SSLError(f"--num-images {num_images}: must be 1 or more")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise SSLError(f"--threshold {threshold}: the attention mass to keep must be in (0, 1], e.g. 0.6")
    if size is not None and size < 1:
        raise SSLError(f"--size {size}: must be a positive number of pixels")
    if zoom is not None and zoom < 1:
        raise SSLError(f"--zoom {zoom}: must be 1 or more")

    model, meta = load_backbone(checkpoint, with_meta=True)
    name = str(meta.get("backbone", {}).get("name", "an unknown backbone"))
    vit = vit_backbone(model, name)
    pre = meta.get("preprocessing") or {}
    if size is None:
        if "input_size" not in pre:
            raise CheckpointError(f"{checkpoint}: metadata lacks preprocessing.input_size; pass --size")
        size = int(pre["input_size"][-1])
    set_input_size(vit, size, name)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in preprocessing_stats(meta))
    zoom = zoom or max(1, math.ceil(MIN_PANEL / size))

    images = open_images(data)
    count = min(num_images, len(images))
    dev = resolve_device(device)
    vit = vit.to(dev).eval()
    crop = eval_transform(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # the evaluation crop, pixels in [0, 1]
    patch = tuple(int(p) for p in vit.patch_embed.patch_size)
    out = Path(out).expanduser() if out is not None else default_out_dir(checkpoint)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: cannot create the folder ({e})") from None

    written: list[str] = []
    heads, grid = 0, (0, 0)
    for start in range(0, count, BATCH):
        idx = range(start, min(start + BATCH, count))
        pixels = torch.stack([crop(images.load(i)) for i in idx])  # b x 3 x S x S in [0, 1]
        attention, grid = cls_attention(vit, ((pixels - mean) / std).to(dev))
        heads = attention.shape[1]
        for i, px, att in zip(idx, pixels, attention.cpu(), strict=True):
            shown = (px * 255).round().clamp(0, 255).to(torch.uint8)
            path = out / _file_name(images, i)
            try:
                render(shown, att, patch, threshold, zoom).save(path)
            except OSError as e:
                raise DataError(f"cannot write {path}: {e}") from None
            written.append(str(path))
            if progress:
                progress(path)
    return {"images": written, "heads": heads, "grid": list(grid), "out": str(out), "size": size, "zoom": zoom}


__all__ = [
    "cls_attention",
    "colorize",
    "last_block_attention",
    "mass_masks",
    "render",
    "visualize",
]
