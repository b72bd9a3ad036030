"""``ssl export``: the backbone alone as safetensors (timm keys + JSON config), TorchScript, ONNX or a Hugging Face-
style folder that timm loads with ``local-dir:``. Every file is loaded back and checked against PyTorch's output.

``--projector-layers K`` keeps the first K layers of the method's MLP projector on top of the backbone
(SimCLR v2 fine-tunes from the projection head's first layer, arXiv:2006.10029).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ssl_cli.cli.console import emit_json, err, handles_errors, result_table, stdout

OWN_ENCODER_PREFIXES = ("amdim_", "cmc_")
"""timm names of ``ssl_cli.encoders`` (not imported here: the CLI starts without torch and timm)."""


def _grid(readout: dict) -> str:
    """CPC v2's readout in words (the CLI starts without torch: not ``ssl_cli.artifacts.readout``)."""
    g = readout.get("grid")
    return f"{f'{g}x{g} ' if g else ''}grid of {readout['patch']} px patches {readout['stride']} apart"


def _hint(summary: dict) -> str:
    path, fmt = summary["path"], summary["format"]
    readout = summary.get("readout")
    if readout and fmt in ("torchscript", "onnx"):
        size = "x".join(str(v) for v in summary["input_size"][1:])
        inside = (
            f"input N x 3 x {size.replace('x', ' x ')} normalised; the {_grid(readout)} is cut inside and the image "
            f"feature (N x {summary['num_features']}) is the mean of the patch features"
        )
        run = f"torch.jit.load('{path}')" if fmt == "torchscript" else f"onnxruntime.InferenceSession('{path}')"
        return f"load with {run}; {inside}"
    if fmt == "torchscript":
        return (
            f"load with torch.jit.load('{path}'); input N x 3 x H x W normalised, output N x {summary['num_features']}"
        )
    if fmt == "onnx":
        return f"run with onnxruntime.InferenceSession('{path}').run(None, {{'images': batch}}) (float32 N x 3 x H x W)"
    hint = _timm_hint(summary, path, fmt)
    if not readout:
        return hint
    feature = f"the image feature (what ssl knn reads) is the mean of its features over the {_grid(readout)}"
    if summary["small_stem"] or summary.get("projector_layers"):
        return f"{hint}; its .encoder is the encoder of one {readout['patch']} px patch, and {feature}"
    # CPC v2: timm gives the patch encoder
    return f"{hint}: the encoder of one {readout['patch']} px patch; {feature}: ssl_cli.load_backbone('{path}')"


def _timm_hint(summary: dict, path: str, fmt: str) -> str:
    # ssl's own encoders (AMDIM's, CMC's) are in timm's registry once ssl_cli is imported
    first = "import ssl_cli, then " if summary["architecture"].startswith(OWN_ENCODER_PREFIXES) else ""
    if fmt == "hf":
        return f"load with {first}timm.create_model('local-dir:{path}', pretrained=True)"
    if summary.get("projector_layers"):
        return f"backbone + {summary['projector_layers']} projector layer(s): load with ssl_cli.load_backbone('{path}')"
    if summary["small_stem"]:
        return f"small stem: load with ssl_cli.load_backbone('{path}')"
    # the recipe's backbone.kwargs (e.g. CPC v2's norm_layer='groupnorm1') build the same architecture in timm
    kwargs = "".join(f"{k}={v!r}, " for k, v in summary.get("timm_kwargs", {}).items())
    return (
        f"load with {first}timm.create_model('{summary['architecture']}', num_classes=0, {kwargs}pretrained=True, "
        f"pretrained_cfg_overlay=dict(file='{path}'))"
    )


@handles_errors
def export(
    checkpoint: Path = typer.Argument(..., help="Training checkpoint (.safetensors), or an earlier export."),
    out: str = typer.Option(
        None,
        "--out",
        "-o",
        help="File or folder to write (default: backbone.safetensors / .pt / .onnx / backbone/ for the format). "
        "The suffix picks the format when --format is not given: .safetensors, .pt or .torchscript, .onnx, "
        "a folder (no suffix or a trailing /) for hf.",
        show_default=False,
    ),
    fmt: str = typer.Option(
        None,
        "--format",
        help="safetensors (timm keys + OUT.json), torchscript, onnx (needs the onnx extra: "
        "pip install 'ssl-cli[onnx]'), or hf (a folder for timm.create_model('local-dir:OUT', pretrained=True)). "
        "Default: from --out, else safetensors.",
        show_default=False,
    ),
    projector_layers: int = typer.Option(
        0,
        "--projector-layers",
        min=0,
        help="Also keep the first K layers (Linear + norm + ReLU) of the method's MLP projector; the export's "
        "output is then the projector's K-th layer (SimCLR v2: 1). 0: the backbone alone.",
    ),
    output_view: str = typer.Option(
        None,
        "--output-view",
        help="CMC: export the features of one colour view's network (e.g. L, ab) or all (every view's, "
        "concatenated); recorded in the export's timm kwargs. Default: the checkpoint's own (all for a default run).",
        show_default=False,
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """Write the backbone in one format, load it back and compare its features with PyTorch's (max abs diff)."""
    from ssl_cli.export.formats import export_model

    summary = export_model(checkpoint, out, fmt, projector_layers=projector_layers, output_view=output_view)
    if as_json:
        emit_json(summary)
        return
    shown = {**summary, "max_abs_diff": f"{summary['max_abs_diff']:.3g}", "tolerance": f"{summary['tolerance']:.3g}"}
    if summary.get("readout"):
        shown["readout"] = f"mean over the {_grid(summary['readout'])}"
    if check := summary.get("readout_check"):
        shown["readout_check"] = f"max abs difference {check['max_abs_diff']:.3g} ({check['verified_with']})"
    stdout.print(result_table("export", shown))
    err.print(
        f"checked with {summary['verified_with']}: max abs difference {summary['max_abs_diff']:.3g} "
        f"(tolerance {summary['tolerance']:.3g})",
        markup=False,
    )
    err.print(_hint(summary), markup=False)
