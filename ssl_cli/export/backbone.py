"""Export a trained backbone so that timm (or ``ssl_cli.load_backbone``) loads it without ``ssl``'s trainer.

``export_backbone(ckpt, out)`` writes ``out`` (safetensors, keys exactly as the timm model's
``state_dict``) and ``out.with_suffix('.json')``: timm name, kwargs, stem change, mean / std, input size.
For a stock timm architecture::

    timm.create_model(name, num_classes=0, pretrained=True, pretrained_cfg_overlay=dict(file=out))

loads it; for a changed stem (``small_stem``), ``ssl_cli.load_backbone(out)`` rebuilds it.

A CPC v2 checkpoint's export holds the same timm weights (timm gives the encoder of one patch) and records the
patch grid in ``readout`` (metadata and JSON config): ``ssl_cli.load_backbone(out)`` returns the image feature the
paper's linear evaluation reads, the mean of the pooled patch features over the grid (``ssl_cli.artifacts.readout``).
``PreparedExport.model`` is that readout, so the TorchScript and ONNX exports hold it whole.

``export_backbone(ckpt, out, projector_layers=k)`` also keeps the first ``k`` layers of the method's MLP
projector (each Linear with its normalisation and ReLU): SimCLR v2 fine-tunes from the middle of the
projection head [0, Sec. 2]. The file then holds the backbone's timm keys plus ``projector.*`` keys, the
metadata describes the head's layers, and ``ssl_cli.load_backbone(out)`` returns a model whose output is
the head applied to the pooled features (``num_features`` = the head's width).

[0] SimCLR v2, Chen et al. 2020, arXiv:2006.10029.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ssl_cli
from ssl_cli.artifacts.atomic import atomic_write_text
from ssl_cli.artifacts.backbone import PROJECTOR_PREFIX, ProjectedBackbone, rebuild, select_output_view
from ssl_cli.artifacts.checkpoint import EXPORT_FORMAT, FORMAT
from ssl_cli.artifacts.readout import readout_of, with_readout
from ssl_cli.artifacts.safetensors_io import atomic_save, read_safetensors
from ssl_cli.artifacts.state import load_state
from ssl_cli.errors import CheckpointError

READOUT_CHANGE = (
    "the weights are the encoder of one patch (timm.create_model loads it); the image feature is the mean of its "
    "pooled features over the patch grid in 'readout' (patch px, stride apart, each patch alone): "
    "ssl_cli.load_backbone(file) gives it"
)
"""``backbone.json``'s note on a CPC v2 export (``readout``)."""


def head_spec(head: nn.Sequential) -> list[dict[str, Any]]:
    """A JSON description of a projector prefix's modules, enough to rebuild it without the method."""
    spec: list[dict[str, Any]] = []
    for m in head:
        if isinstance(m, nn.Linear):
            spec.append({"type": "linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None})
        elif isinstance(m, nn.BatchNorm1d):
            bn = {"type": "batchnorm", "dim": m.num_features, "affine": m.affine, "eps": m.eps}
            spec.append({**bn, "shift": False} if m.affine and m.bias is None else bn)  # SimCLR's scale-only BN
        elif isinstance(m, nn.GroupNorm):
            spec.append({"type": "groupnorm", "groups": m.num_groups, "dim": m.num_channels, "eps": m.eps})
        elif isinstance(m, nn.ReLU):
            spec.append({"type": "relu"})
        else:
            raise CheckpointError(f"--projector-layers: cannot export a projector layer of type {type(m).__name__}")
    return spec


def projector_prefix(projector: nn.Module, layers: int) -> nn.Sequential:
    """The first ``layers`` linear layers of an MLP projector, each with the normalisation / ReLU after it."""
    modules = list(projector) if isinstance(projector, nn.Sequential) else []
    starts = [i for i, m in enumerate(modules) if isinstance(m, nn.Linear)]
    if layers > len(starts):
        raise CheckpointError(f"--projector-layers {layers}: the projector has only {len(starts)} linear layers")
    end = starts[layers] if layers < len(starts) else len(modules)
    return nn.Sequential(*modules[:end])


def _checkpoint_head(tensors: dict[str, torch.Tensor], meta: dict[str, Any], layers: int, in_dim: int, path: Path):
    """The first ``layers`` projector layers of a training checkpoint's method (eval mode)."""
    from ssl_cli.heads import projector

    if meta.get("format") != FORMAT:
        raise CheckpointError(f"--projector-layers needs a training checkpoint; {path} is an export")
    method_cfg = meta.get("recipe", {}).get("method", {})
    name = method_cfg.get("name", meta.get("method"))
    if method_cfg.get("projector") != "mlp":
        kind = method_cfg.get("projector", "none")
        raise CheckpointError(f"--projector-layers {layers}: method '{name}' has no MLP projector (projector: {kind})")
    from ssl_cli.config import recipe_from_dict

    cfg = recipe_from_dict(meta["recipe"], source=f"{path} (recipe)").method
    head, _ = projector(cfg, in_dim)
    state = {k[len("model.projector.") :]: v for k, v in tensors.items() if k.startswith("model.projector.")}
    load_state(head, state, f"{path}: the projector weights do not fit method '{name}'")
    return projector_prefix(head, layers).eval()


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


@dataclass
class PreparedExport:
    """What every export format writes: the eval-mode model, its tensors (timm keys) and metadata."""

    checkpoint: Path
    model: nn.Module
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    """The export's safetensors metadata (``format`` = ``ssl-backbone/1``)."""
    config: dict[str, Any]
    """The JSON config written beside a safetensors export (also ``meta["config"]``)."""
    projector_layers: int = 0
    output_view: str | None = None
    """CMC: the colour view(s) asked for (recorded in ``meta["backbone"]["kwargs"]``); None: the checkpoint's own."""


def _source(meta: dict[str, Any]) -> dict[str, Any]:
    """How the weights were trained (recipe, data, epoch, last metrics), kept for ``ssl inspect`` of an export."""
    if meta.get("format") == EXPORT_FORMAT:
        return dict(meta.get("source") or {})
    keys = ("ssl_version", "method", "recipe", "data", "epoch", "step", "metrics", "monitor", "world_size")
    return {k: meta[k] for k in keys if k in meta}


def prepare_export(checkpoint: str | Path, projector_layers: int = 0, output_view: str | None = None) -> PreparedExport:
    """Rebuild the backbone (plus ``projector_layers`` projector layers) of a checkpoint or export, in eval mode;
    ``output_view`` (CMC's encoders): ``"all"`` or one colour view's name, recorded in the export's backbone kwargs."""
    if projector_layers < 0:
        raise CheckpointError(f"--projector-layers {projector_layers}: must be 0 (backbone only) or more")
    path = Path(checkpoint).expanduser()
    ckpt_tensors, meta = read_safetensors(path)
    if projector_layers > 0 and meta.get("format") == EXPORT_FORMAT and meta.get("projector"):
        raise CheckpointError(f"{path} is already an export with projector layers; export from the training checkpoint")
    model = rebuild(ckpt_tensors, meta, path)
    meta = select_output_view(model, output_view, meta, path)
    tensors = model.state_dict()
    head = None
    if projector_layers > 0:
        head = _checkpoint_head(ckpt_tensors, meta, projector_layers, int(model.num_features), path)
        spec = head_spec(head)
        width = next(s["out"] for s in reversed(spec) if s["type"] == "linear")
        tensors = {**tensors, **{PROJECTOR_PREFIX + k: v for k, v in head.state_dict().items()}}
        model = ProjectedBackbone(model, head, width)
    elif isinstance(model, ProjectedBackbone):  # an export that already holds projector layers
        projector_layers = int(meta["projector"]["num_layers"])
        head, spec, width = model.head, meta["projector"]["layers"], int(model.num_features)
        tensors = {
            **model.backbone.state_dict(),
            **{PROJECTOR_PREFIX + k: v for k, v in model.head.state_dict().items()},
        }
    config = export_config(meta, model)
    if meta.get("format") == EXPORT_FORMAT:  # re-exporting an export: keep what it said about its training
        config.update({k: meta.get("config", {}).get(k, config[k]) for k in ("method", "epoch")})
    export_meta = {
        "format": EXPORT_FORMAT,
        "backbone": meta["backbone"],
        "preprocessing": meta["preprocessing"],
        "config": config,
        "source": _source(meta),
    }
    if readout := readout_of(meta, path):  # CPC v2: the weights stay timm's, the metadata records the grid
        model = with_readout(model, readout)
        export_meta["readout"] = config["readout"] = readout
        config["readout_change"] = READOUT_CHANGE
    if head is not None:
        config["projector_layers"] = projector_layers
        config["projector_change"] = (
            f"the output is the first {projector_layers} projector layer(s) on the pooled features; "
            "rebuild with ssl_cli.load_backbone(file)"
        )
        export_meta["projector"] = {"layers": spec, "num_layers": projector_layers, "num_features": width}
    return PreparedExport(path, model.eval(), tensors, export_meta, config, projector_layers, output_view)


def write_safetensors_export(prepared: PreparedExport, out: Path) -> dict[str, Any]:
    """``out`` (safetensors, timm keys) and ``out.with_suffix('.json')``, each written atomically."""
    atomic_save(prepared.tensors, prepared.meta, out)
    config_path = out.with_suffix(".json")
    atomic_write_text(config_path, json.dumps(prepared.config, indent=2) + "\n")
    config = prepared.config
    return {
        "backbone": str(out),
        "config": str(config_path),
        "architecture": config["architecture"],
        "num_features": config["num_features"],
        "small_stem": config["small_stem"],
        **({"projector_layers": prepared.projector_layers} if prepared.projector_layers else {}),
        **({"readout": prepared.meta["readout"]} if prepared.meta.get("readout") else {}),
    }


def export_backbone(
    checkpoint: str | Path, out: str | Path, projector_layers: int = 0, output_view: str | None = None
) -> dict[str, Any]:
    """Write the backbone weights (timm keys) and a JSON config beside them; returns a summary.

    ``projector_layers = k > 0``: also the first k layers of the method's MLP projector (see the module doc).
    ``output_view`` (CMC's encoders): ``"all"`` or one colour view's name; the export then gives that view's
    features, and its config's ``timm_kwargs`` say so (None: the checkpoint's own).
    The other formats (TorchScript, ONNX, a Hugging Face-style folder), and the check of what was written,
    are ``ssl_cli.export.formats.export_model``.
    """
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise CheckpointError(f"--out {out}: the file name must end in .safetensors")
    if out.resolve() == Path(checkpoint).expanduser().resolve():
        raise CheckpointError(f"--out {out} is the checkpoint itself; choose another file")
    if projector_layers < 0:
        raise CheckpointError(f"--projector-layers {projector_layers}: must be 0 (backbone only) or more")
    path = Path(checkpoint).expanduser()
    prepared = prepare_export(path, projector_layers, output_view)
    if projector_layers == 0 and prepared.projector_layers:
        raise CheckpointError(f"{path} is already an export with projector layers; export from the training checkpoint")
    return write_safetensors_export(prepared, out)
