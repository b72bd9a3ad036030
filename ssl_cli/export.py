"""Export a trained backbone so that timm (or ``ssl_cli.load_backbone``) loads it without ``ssl``'s trainer.

``export_backbone(ckpt, out)`` writes ``out`` (safetensors, keys exactly as the timm model's
``state_dict``) and ``out.with_suffix('.json')``: timm name, kwargs, stem change, mean / std, input size.
For a stock timm architecture::

    timm.create_model(name, num_classes=0, pretrained=True, pretrained_cfg_overlay=dict(file=out))

loads it; for a changed stem (``small_stem``), ``ssl_cli.load_backbone(out)`` rebuilds it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ssl_cli
from ssl_cli.backbones import build_backbone
from ssl_cli.config.schema import BackboneConfig
from ssl_cli.errors import CheckpointError
from ssl_cli.train.checkpoint import EXPORT_FORMAT, FORMAT, atomic_save, read_safetensors


def backbone_config(meta: dict[str, Any]) -> BackboneConfig:
    """The ``[backbone]`` section a checkpoint or export was made with."""
    if "recipe" in meta and isinstance(meta["recipe"], dict) and "backbone" in meta["recipe"]:
        return BackboneConfig.model_validate(meta["recipe"]["backbone"])
    b = meta["backbone"]
    kwargs = dict(b.get("kwargs", {}))
    return BackboneConfig(
        name=b["name"],
        small_stem=bool(b.get("small_stem", False)),
        norm=b.get("norm", "batchnorm"),
        img_size=kwargs.pop("img_size", None),
        patch_size=kwargs.pop("patch_size", None),
        drop_path_rate=float(kwargs.pop("drop_path_rate", 0.0)),
        kwargs=kwargs,
    )


def _backbone_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    if meta.get("format") == FORMAT:
        prefix = "model.backbone."
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if meta.get("format") == EXPORT_FORMAT:
        return tensors
    raise CheckpointError(
        f"{path} is neither an ssl checkpoint nor an ssl export (format: {meta.get('format', 'missing')})"
    )


def load_backbone(path: str | Path, device: str = "cpu", with_meta: bool = False):
    """Rebuild the timm backbone saved in a training checkpoint or an exported file (eval mode)."""
    path = Path(path).expanduser()
    tensors, meta = read_safetensors(path)
    state = _backbone_state(tensors, meta, path)
    if "backbone" not in meta:
        raise CheckpointError(f"{path}: metadata lacks 'backbone'; cannot rebuild the model")
    torch.manual_seed(0)
    model = build_backbone(backbone_config(meta).model_copy(update={"freeze_patch_embed": False}))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit {meta['backbone'].get('name')}: {first}") from None
    model.to(device).eval()
    return (model, meta) if with_meta else model


def export_config(meta: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    b = meta["backbone"]
    pre = meta["preprocessing"]
    return {
        "architecture": b["name"],
        "num_classes": 0,
        "num_features": int(model.num_features),
        "timm_kwargs": b.get("kwargs", {}),
        "small_stem": bool(b.get("small_stem", False)),
        "stem_change": (
            "conv1 is 3x3 stride 1 and maxpool is removed; rebuild with ssl_cli.load_backbone(file)"
            if b.get("small_stem")
            else None
        ),
        "norm": b.get("norm", "batchnorm"),
        "norm_change": (
            "GroupNorm + weight-standardised convolutions; rebuild with ssl_cli.load_backbone(file)"
            if b.get("norm", "batchnorm") != "batchnorm"
            else None
        ),
        "mean": pre["mean"],
        "std": pre["std"],
        "input_size": pre["input_size"],
        "method": meta.get("method"),
        "epoch": meta.get("epoch"),
        "ssl_version": ssl_cli.__version__,
    }


def export_backbone(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the backbone weights (timm keys) and a JSON config beside them; returns a summary."""
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise CheckpointError(f"--out {out}: the file name must end in .safetensors")
    if out.resolve() == Path(checkpoint).expanduser().resolve():
        raise CheckpointError(f"--out {out} is the checkpoint itself; choose another file")
    model, meta = load_backbone(checkpoint, with_meta=True)
    config = export_config(meta, model)
    export_meta = {
        "format": EXPORT_FORMAT,
        "backbone": meta["backbone"],
        "preprocessing": meta["preprocessing"],
        "config": config,
    }
    atomic_save(model.state_dict(), export_meta, out)
    config_path = out.with_suffix(".json")
    tmp = config_path.with_name(f".{config_path.name}.tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, config_path)
    return {
        "backbone": str(out),
        "config": str(config_path),
        "architecture": config["architecture"],
        "num_features": config["num_features"],
        "small_stem": config["small_stem"],
    }
