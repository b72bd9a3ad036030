"""``ssl inspect``: what a checkpoint or export is (method, backbone, epoch, data, last metrics), as a table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ssl_cli.cli.console import emit_json, handles_errors, stdout

FORMAT_NAMES = {
    "safetensors": "safetensors file",
    "hf": "Hugging Face-style folder (config.json + model.safetensors)",
    "torchscript": "TorchScript archive",
    "onnx": "ONNX model",
}

INTEGRITY = {
    "verified": "verified: the tensors match the SHA-256 recorded when the file was written",
    "not recorded": "no tensor hash recorded (written by an older ssl): not verified",
}


def human_size(n: int) -> str:
    value, unit = float(n), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n:,} bytes" if unit == "bytes" else f"{value:.1f} {unit} ({n:,} bytes)"


def _number(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _image_feature(readout: dict[str, Any], fmt: str) -> str:
    """How a CPC v2 file's image becomes its feature (``ssl_cli.artifacts.readout``)."""
    g, p, s = readout.get("grid"), readout["patch"], readout["stride"]
    where = (
        "the file runs the whole readout" if fmt in ("torchscript", "onnx") else "timm loads the encoder of one patch"
    )
    return (
        f"the mean of the encoder's pooled features over a {g}x{g} grid of {p} px patches {s} apart, each patch "
        f"through the encoder alone (CPC v2's linear evaluation; {where})"
    )


def rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The table's rows: only what the file says, in reading order."""
    r: list[tuple[str, str]] = [("file", info["path"])]
    r.append(("is", f"{info['kind']}, {FORMAT_NAMES.get(info['format'], info['format'])}"))
    r.append(("size", human_size(info["file_size"])))
    if info.get("ssl_version"):
        r.append(("ssl version", info["ssl_version"]))
    if info.get("method"):
        r.append(("method", info["method"]))
    if info.get("recipe"):
        desc = info.get("recipe_description")
        r.append(("recipe", f"{info['recipe']}: {desc}" if desc else info["recipe"]))
    b = info.get("backbone") or {}
    if b.get("name"):
        changes = [f"{k}={v}" for k, v in (b.get("kwargs") or {}).items()]
        if b.get("stem") == "timm":
            changes.append("timm's own stem")
        elif b.get("small_stem"):
            changes.append("small stem: 3x3 conv1, no max-pool")
        changes += [f"norm {b['norm']}"] if b.get("norm", "batchnorm") != "batchnorm" else []
        r.append(("backbone", f"timm {b['name']}" + (f" ({', '.join(changes)})" if changes else "")))
        params = b.get("parameters")
        r.append(("parameters", f"{params:,} (backbone)" if params is not None else "unknown"))
    if info.get("projector_layers"):
        r.append(("projector layers", f"{info['projector_layers']} (kept on top of the backbone)"))
    if info.get("num_features") is not None:
        r.append(("features", str(info["num_features"])))
    if info.get("readout"):
        r.append(("image feature", _image_feature(info["readout"], info["format"])))
    if info.get("epoch") is not None:
        of = f" of {info['epochs']}" if info.get("epochs") else ""
        step = f", step {info['step']:,}" if info.get("step") is not None else ""
        within = f" + {info['epoch_step']} steps of the next (a mid-epoch checkpoint)" if info.get("epoch_step") else ""
        r.append(("trained", f"epoch {info['epoch']}{of}{within}{step}"))
    if info.get("schedule_segments"):
        parts = [f"from step {first:,}: {epochs} epochs" for first, epochs in info["schedule_segments"]]
        r.append(("schedule", "; ".join(parts) + " (--extend-to)"))
    data = info.get("data")
    if data:
        spec = f" ({data['spec']})" if data.get("spec") and data["spec"] != data.get("name") else ""
        images = f"{data['num_images']:,} images" if data.get("num_images") is not None else "? images"
        classes = f", {data['num_classes']} classes" if data.get("num_classes") else ", unlabeled"
        r.append(("data", f"{data.get('name')}{spec}: {images}{classes}"))
    metrics = info.get("metrics") or {}
    if metrics:
        parts = []
        if "loss" in metrics:
            parts.append(f"loss {metrics['loss']:.4f}")
        if "lr" in metrics:
            parts.append(f"lr {metrics['lr']:.3g}")
        if "images_per_second" in metrics:
            parts.append(f"{metrics['images_per_second']:.0f} images/s")
        if "seconds" in metrics:
            parts.append(f"{metrics['seconds']:.1f} s")
        r.append(("epoch so far" if info.get("epoch_step") else "last epoch", ", ".join(parts) or "-"))
        others = {k: v for k, v in metrics.items() if k not in ("loss", "lr", "images_per_second", "seconds")}
        evals = {k: v for k, v in others.items() if "knn" in k or "online" in k or "top" in k}
        if evals:
            val = (info.get("monitor") or {}).get("val")
            where = f" (on {val})" if val else ""
            r.append(("monitors", ", ".join(f"{k} {_number(v)}" for k, v in evals.items()) + where))
        rest = {k: v for k, v in others.items() if k not in evals}
        if rest:
            r.append(("method metrics", ", ".join(f"{k} {_number(v)}" for k, v in rest.items())))
    pre = info.get("preprocessing") or {}
    if pre:
        size = "x".join(str(v) for v in pre.get("input_size", []))
        r.append(("preprocessing", f"input {size}, mean {pre.get('mean')}, std {pre.get('std')}"))
    if info.get("onnx"):
        g = info["onnx"]
        r.append(("onnx graph", f"opset {g['opset']}, inputs {g['inputs']}, outputs {g['outputs']}"))
    if info.get("tensors_sha256"):
        r.append(("integrity", INTEGRITY.get(info["tensors_sha256"], info["tensors_sha256"])))
    if info.get("timm_config"):
        r.append(("load", f"timm.create_model('local-dir:{info['path']}', pretrained=True)"))
    return r


@handles_errors
def inspect(
    checkpoint: Path = typer.Argument(
        ..., help="A training checkpoint, or an export (.safetensors, hf folder, .pt TorchScript, .onnx)."
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout (with the full resolved recipe)."),
) -> None:
    """What a checkpoint or export is: method, backbone, recipe, epoch, training data, last metrics, preprocessing."""
    from ssl_cli.export.inspect import describe

    info = describe(checkpoint)
    if as_json:
        emit_json(info)
        return
    table = Table(title="inspect", show_header=False, title_justify="left")
    table.add_column("key", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in rows(info):
        table.add_row(key, value)
    stdout.print(table)
