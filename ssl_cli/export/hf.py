"""``ssl export --format hf``: a folder that timm loads by itself, in its Hugging Face hub layout.

The folder holds ``model.safetensors`` (the backbone with timm's ``state_dict`` keys; its header carries the
``ssl`` metadata, so ``ssl_cli.load_backbone(folder)`` and ``ssl inspect`` read it too) and ``config.json``
as timm's ``push_to_hf_hub`` writes it: ``architecture``, ``num_classes`` 0, ``num_features``,
``model_args`` (the keyword arguments the backbone was built with, e.g. a ViT's ``img_size`` and
``patch_size``) and ``pretrained_cfg`` (mean / std, input size, interpolation, crop). Then::

    timm.create_model("local-dir:/path/to/folder", pretrained=True)

returns the backbone (timm >= 1.0 with ``local-dir:``), and the folder can be uploaded to the hub as is.
Only stock timm architectures qualify: the CIFAR stem, GroupNorm + weight standardisation and projector
layers are changes timm cannot rebuild from a config, so those are refused with the formats that do work.

A CPC v2 checkpoint's folder holds its patch encoder: timm returns the feature of one patch, and
``ssl_cli.load_backbone(folder)`` the image feature (the mean over the patch grid its metadata records in
``readout``).

Preprocessing: ``ssl`` evaluates with a bilinear resize of the short side to size / 0.875 and a centre crop,
but images already at the input size are only cropped. ``crop_pct`` is therefore 0.875, except for inputs of
at most 64 pixels (CIFAR-style recipes, trained and evaluated on images of their own size), where it is 1.0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm

from ssl_cli.artifacts.backbone import HF_WEIGHTS, load_backbone
from ssl_cli.artifacts.safetensors_io import atomic_save
from ssl_cli.encoders.patch_grid import patch_encoder
from ssl_cli.errors import CheckpointError
from ssl_cli.export.backbone import PreparedExport
from ssl_cli.export.checks import compare

SMALL_INPUT = 64
"""Inputs of at most this many pixels get ``crop_pct`` 1.0 (see the module doc)."""
OTHER_FORMATS = "--format torchscript, --format onnx, or --format safetensors (loaded with ssl_cli.load_backbone)"


def refuse_non_stock(prepared: PreparedExport) -> None:
    """A one-line error for a backbone that ``timm.create_model`` cannot rebuild from ``config.json``."""
    b = prepared.meta["backbone"]
    changes = []
    if b.get("small_stem"):
        changes.append("the small (CIFAR) stem")
    if b.get("norm", "batchnorm") != "batchnorm":
        changes.append(f"norm {b['norm']}")
    if prepared.projector_layers:
        changes.append(f"{prepared.projector_layers} projector layer(s)")
    if changes:
        raise CheckpointError(
            f"--format hf: {b['name']} with {' and '.join(changes)} is not a stock timm architecture, so timm cannot "
            f"rebuild it from a config.json; use {OTHER_FORMATS}"
        )


def _global_pool(model) -> str | None:
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)
    return pool if isinstance(pool, str) and pool else None


def hf_config(prepared: PreparedExport) -> dict[str, Any]:
    """``config.json`` in timm's hub format (what ``timm.models.load_model_config_from_path`` reads)."""
    model, meta = patch_encoder(prepared.model), prepared.meta
    b, pre = meta["backbone"], meta["preprocessing"]
    timm_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    size = [int(v) for v in pre["input_size"]]
    pretrained_cfg = {
        "tag": f"ssl_{prepared.config.get('method') or 'export'}",
        "custom_load": False,
        "input_size": size,
        "fixed_input_size": bool(timm_cfg.get("fixed_input_size", False)),
        "interpolation": "bilinear",
        "crop_pct": 1.0 if max(size[1:]) <= SMALL_INPUT else 0.875,
        "crop_mode": "center",
        "mean": list(pre["mean"]),
        "std": list(pre["std"]),
        "num_classes": 0,
        "pool_size": None,
        "first_conv": timm_cfg.get("first_conv"),
        "classifier": timm_cfg.get("classifier"),
    }
    config: dict[str, Any] = {
        "architecture": b["name"],
        "num_classes": 0,
        "num_features": int(model.num_features),
    }
    if pool := _global_pool(model):
        config["global_pool"] = pool
    config["model_args"] = {"num_classes": 0, **b.get("kwargs", {})}
    config["pretrained_cfg"] = {k: v for k, v in pretrained_cfg.items() if v is not None or k == "pool_size"}
    return config


def _timm_local_dir(folder: Path):
    try:
        from timm.models._hub import load_model_config_from_path  # noqa: F401 - present where local-dir: is
    except ImportError:
        raise CheckpointError(
            f"--format hf is checked by loading it with timm's local-dir:, which timm {timm.__version__} lacks; "
            "pip install -U timm"
        ) from None
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


def write_hf(prepared: PreparedExport, folder: Path) -> dict[str, Any]:
    """Write ``model.safetensors`` + ``config.json`` into ``folder``; check them through timm."""
    config = hf_config(prepared)
    atomic_save(prepared.tensors, prepared.meta, folder / HF_WEIGHTS)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    try:
        loaded = _timm_local_dir(folder)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - timm could not rebuild it: the export is not usable
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"timm cannot load the written folder: {type(e).__name__}: {first}") from None
    size, what = prepared.meta["preprocessing"]["input_size"], f"timm {timm.__version__} local-dir:"
    if not prepared.meta.get("readout"):
        check = compare(prepared.model, loaded, size, what)
        return {"config": str(folder / "config.json"), "weights": str(folder / HF_WEIGHTS), **check}
    # CPC v2: timm gives the encoder of one patch (checked on patches); ssl_cli.load_backbone the image feature
    patch = prepared.meta["readout"]["patch"]
    check = compare(patch_encoder(prepared.model), loaded, [size[0], patch, patch], f"{what} (the patch encoder)")
    readout = compare(prepared.model, load_backbone(folder), size, "ssl_cli.load_backbone (the patch-grid readout)")
    files = {"config": str(folder / "config.json"), "weights": str(folder / HF_WEIGHTS)}
    return {**files, **check, "readout_check": readout}
