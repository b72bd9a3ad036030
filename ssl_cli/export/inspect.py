"""``ssl inspect``: what a checkpoint or export is, read from its metadata without loading its weights.

``describe(checkpoint)`` recognises
- a training checkpoint (``ssl-checkpoint/1`` safetensors): method, recipe, backbone, epoch / step, the
  training data, the last epoch's metrics (loss, lr, images/s, online kNN / probe figures);
- an export: a safetensors export (``ssl-backbone/1``), a Hugging Face-style folder (``ssl export --format
  hf``), a TorchScript archive or an ONNX file written by ``ssl export`` (their ``ssl`` metadata: the ``ssl.json``
  extra file, ``metadata_props["ssl"]``); an export also says how its weights were trained, where it knows.

Both say how an image becomes its feature: ``readout`` is None for the backbone's own output, or CPC v2's patch grid
whose pooled patch features are averaged (``ssl_cli.artifacts.readout``).

A safetensors file is read through its header (``safe_open(...).metadata()`` and the tensor shapes); no tensor
is loaded. Its data section is only hashed in place against the ``tensors_sha256`` it records
(``ssl_cli.artifacts.integrity``: one pass over the bytes, ~0.1 s per 100 MB), so a file corrupted or edited after
writing is refused like everywhere else. The backbone's parameter count comes from building it on the ``meta``
device (no memory, no weights). Anything else is a ``CheckpointError`` (one line, exit 2).
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import torch

from ssl_cli.artifacts.backbone import HF_WEIGHTS, PROJECTOR_PREFIX
from ssl_cli.artifacts.checkpoint import EXPORT_FORMAT, FORMAT
from ssl_cli.artifacts.integrity import verify_file
from ssl_cli.artifacts.metadata import check_metadata
from ssl_cli.artifacts.readout import readout_of
from ssl_cli.errors import CheckpointError
from ssl_cli.export.formats import ONNX_INSTALL, TORCHSCRIPT_META

STANDARD_METRICS = ("loss", "lr", "images_per_second", "seconds")


def _decode(raw: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            meta[k] = v
    return meta


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Metadata (JSON values decoded) and tensor shapes of a safetensors file, without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    return _decode(raw), shapes


def _torchscript_meta(path: Path) -> dict[str, Any] | None:
    """The ``ssl.json`` extra file of a TorchScript archive (a zip); None if it is not one of ours."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(f"/extra/{TORCHSCRIPT_META}")]
            if not names:
                return None
            return json.loads(z.read(names[0]))
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError):
        return None


def _onnx_meta(path: Path) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    try:
        import onnx
    except ImportError:
        raise CheckpointError(f"{path}: reading an ONNX file needs the onnx package: {ONNX_INSTALL}") from None
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises several kinds for a file that is not a model
        raise CheckpointError(f"{path} is not a readable ONNX model ({type(e).__name__})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    graph = {
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "inputs": [i.name for i in proto.graph.input],
        "outputs": [o.name for o in proto.graph.output],
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
    }
    try:
        meta = json.loads(props["ssl"]) if "ssl" in props else None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its 'ssl' metadata is not JSON ({e})") from None
    return meta, graph


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _meta_backbone(meta: dict[str, Any]) -> torch.nn.Module | None:
    """The backbone built on the meta device: shapes only, no memory, no weights (None if it cannot be built)."""
    from ssl_cli.artifacts.backbone import backbone_config
    from ssl_cli.backbones import build_backbone

    try:
        with torch.device("meta"):
            return build_backbone(backbone_config(meta))
    except Exception:  # noqa: BLE001 - an unknown timm name in an old file: the count is just missing
        return None


def backbone_parameters(meta: dict[str, Any]) -> int | None:
    """The backbone's parameter count, from building it on the meta device (None if it cannot be built)."""
    model = _meta_backbone(meta)
    return None if model is None else sum(p.numel() for p in model.parameters())


def _data(data: dict[str, Any] | None) -> dict[str, Any] | None:
    if not data:
        return None
    classes = data.get("classes") or []
    return {
        "name": data.get("name"),
        "spec": data.get("spec"),
        "num_images": data.get("num_images"),
        "num_classes": len(classes),
        "classes": classes,
        **({"val": data["val"]} if data.get("val") else {}),
    }


def _trained(info: dict[str, Any], source: dict[str, Any]) -> None:
    """Fill in how the weights were trained, from a checkpoint's metadata or an export's ``source``."""
    recipe = source.get("recipe") if isinstance(source.get("recipe"), dict) else None
    if recipe:
        info["recipe"] = recipe.get("recipe", {}).get("name")
        info["recipe_description"] = recipe.get("recipe", {}).get("description")
        info["resolved_recipe"] = recipe
        info["method"] = info.get("method") or recipe.get("method", {}).get("name")
        info["epochs"] = recipe.get("train", {}).get("epochs")
    for key in ("method", "epoch", "step", "world_size", "epoch_step", "schedule_segments"):
        if source.get(key) is not None:
            info[key] = source[key]
    info["data"] = _data(source.get("data"))
    metrics = dict(source.get("metrics") or {})
    for key in ("epoch", "step"):
        metrics.pop(key, None)
    info["metrics"] = metrics or None
    if source.get("monitor"):
        info["monitor"] = source["monitor"]
    if source.get("ssl_version"):
        info["ssl_version"] = source["ssl_version"]


def _backbone(meta: dict[str, Any], num_features: int | None) -> dict[str, Any]:
    b = meta.get("backbone") or {}
    model = _meta_backbone(meta) if b.get("name") else None
    stem = None
    if model is not None and hasattr(model, "conv1") and hasattr(model, "maxpool"):  # a ResNet-style stem
        stem = "small" if b.get("small_stem") else "timm"
    return {
        "name": b.get("name"),
        "kwargs": b.get("kwargs", {}),
        "small_stem": bool(b.get("small_stem", False)),
        "stem": stem,
        "norm": b.get("norm", "batchnorm"),
        "num_features": b.get("num_features", num_features),
        "parameters": None if model is None else sum(p.numel() for p in model.parameters()),
    }


def _export_info(meta: dict[str, Any], kind: str, info: dict[str, Any], path: Path, shapes: dict | None = None) -> None:
    check_metadata(meta, path, required=())
    config = meta.get("config") or {}
    info["kind"] = "export"
    info["format"] = kind
    info["format_version"] = meta.get("format")
    info["ssl_version"] = config.get("ssl_version")
    info["method"] = config.get("method")
    info["epoch"] = config.get("epoch")
    _trained(info, meta.get("source") or {})
    info["backbone"] = _backbone(meta, config.get("num_features"))
    info["readout"] = readout_of(meta, path)
    if meta.get("projector"):
        proj = meta["projector"]
        info["projector_layers"] = proj.get("num_layers")
        info["num_features"] = proj.get("num_features")
        if shapes is not None:
            info["projector_parameters"] = sum(
                math.prod(s) for k, s in shapes.items() if k.startswith(PROJECTOR_PREFIX)
            )
    else:
        info["num_features"] = config.get("num_features")


def describe(checkpoint: str | Path) -> dict[str, Any]:
    """What ``checkpoint`` (or an export) is and what its metadata says (see the module doc); raises
    ``CheckpointError``."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    info: dict[str, Any] = {"path": str(path), "file_size": _size(path)}
    if path.is_dir():
        weights, config_path = path / HF_WEIGHTS, path / "config.json"
        if not (weights.is_file() and config_path.is_file()):
            raise CheckpointError(
                f"{path} is a folder but not an hf export (it needs config.json and {HF_WEIGHTS}); give a file"
            )
        meta, shapes = read_header(weights)
        try:
            info["timm_config"] = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{config_path} is not readable JSON ({e})") from None
        if meta.get("format") != EXPORT_FORMAT:
            raise CheckpointError(f"{path}: {HF_WEIGHTS} was not written by ssl export (format: {meta.get('format')})")
        _export_info(meta, "hf", info, weights, shapes)
        info["tensors_sha256"] = _integrity(weights)
        info["preprocessing"] = meta.get("preprocessing")
        return _finish(info)
    with path.open("rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        meta = _torchscript_meta(path)
        if meta is None:
            raise CheckpointError(f"{path} is a zip archive but not a TorchScript export written by ssl")
        _export_info(meta, "torchscript", info, path)
        info["preprocessing"] = meta.get("preprocessing")
        return _finish(info)
    if path.suffix.lower() == ".onnx":
        meta, graph = _onnx_meta(path)
        if meta is None:
            raise CheckpointError(f"{path} is an ONNX model but not one written by ssl export (no 'ssl' metadata)")
        _export_info(meta, "onnx", info, path)
        info["onnx"] = graph
        info["preprocessing"] = meta.get("preprocessing")
        return _finish(info)
    try:
        meta, shapes = read_header(path)
    except CheckpointError as e:
        reason = str(e).split(" (", 1)[1].rstrip(")") if " (" in str(e) else str(e)
        raise CheckpointError(
            f"{path} is not a checkpoint or export: not a safetensors file ({reason}), a TorchScript archive "
            "or an .onnx model"
        ) from None
    fmt = meta.get("format")
    if fmt == FORMAT:
        check_metadata(meta, path, required=())
        info["kind"] = "training checkpoint"
        info["format"] = "safetensors"
        info["format_version"] = FORMAT
        info["ssl_version"] = meta.get("ssl_version")
        info["method"] = meta.get("method")
        _trained(info, meta)
        info["backbone"] = _backbone(meta, None)
        info["readout"] = readout_of(meta, path)
        info["num_features"] = info["backbone"]["num_features"]
        info["model_tensors"] = sum(1 for k in shapes if k.startswith("model."))
        info["optimizer_state"] = any(k.startswith("optim.") for k in shapes)
    elif fmt == EXPORT_FORMAT:
        _export_info(meta, "safetensors", info, path, shapes)
    else:
        raise CheckpointError(
            f"{path} is a safetensors file but not an ssl checkpoint or export "
            f"(format: {fmt or 'missing'}; expected {FORMAT} or {EXPORT_FORMAT})"
        )
    info["tensors_sha256"] = _integrity(path)
    info["preprocessing"] = meta.get("preprocessing")
    return _finish(info)


def _integrity(weights: Path) -> str:
    """``verified`` (the tensors match the hash the file records) or ``not recorded`` (an older file); a mismatch is
    a ``CheckpointError``."""
    return "verified" if verify_file(weights) else "not recorded"


def _finish(info: dict[str, Any]) -> dict[str, Any]:
    """Every key present (None where the file does not say), in a stable order."""
    keys = (
        "path", "kind", "format", "format_version", "file_size", "ssl_version", "method", "recipe",
        "recipe_description", "backbone", "num_features", "projector_layers", "epoch", "epochs", "step", "data",
        "metrics", "monitor", "preprocessing", "readout", "tensors_sha256",
    )  # fmt: skip
    ordered = {k: info.get(k) for k in keys}
    ordered.update({k: v for k, v in info.items() if k not in ordered})
    return ordered
