"""``ssl export``: the backbone alone, with timm's keys, plus a JSON config beside it.

``--projector-layers K`` keeps the first K layers of the method's MLP projector on top of the backbone
(SimCLR v2 fine-tunes from the projection head's first layer, arXiv:2006.10029).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ssl_cli.cli.console import emit_json, err, handles_errors, out, result_table


@handles_errors
def export(
    checkpoint: Path = typer.Argument(..., help="Training checkpoint (.safetensors)."),
    output: Path = typer.Option(Path("backbone.safetensors"), "--out", "-o", help="Backbone file to write."),
    projector_layers: int = typer.Option(
        0,
        "--projector-layers",
        min=0,
        help="Also keep the first K layers (Linear + norm + ReLU) of the method's MLP projector; the export's "
        "output is then the projector's K-th layer (SimCLR v2: 1). 0: the backbone alone.",
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """Write the backbone weights (timm state_dict keys) and OUT.json (name, kwargs, stem, mean/std, size)."""
    from ssl_cli.export import export_backbone

    summary = export_backbone(checkpoint, output, projector_layers=projector_layers)
    if as_json:
        emit_json(summary)
        return
    out.print(result_table("export", summary))
    if summary.get("projector_layers"):
        err.print(
            f"backbone + {summary['projector_layers']} projector layer(s): load with "
            f"ssl_cli.load_backbone('{summary['backbone']}')"
        )
    elif summary["small_stem"]:
        err.print(f"small stem: load with ssl_cli.load_backbone('{summary['backbone']}')")
    else:
        err.print(
            f"load with timm.create_model('{summary['architecture']}', num_classes=0, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file='{summary['backbone']}'))"
        )
