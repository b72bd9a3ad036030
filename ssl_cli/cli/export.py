"""``ssl export``: the backbone alone, with timm's keys, plus a JSON config beside it."""

from __future__ import annotations

from pathlib import Path

import typer

from ssl_cli.cli.console import emit_json, err, handles_errors, out, result_table


@handles_errors
def export(
    checkpoint: Path = typer.Argument(..., help="Training checkpoint (.safetensors)."),
    output: Path = typer.Option(Path("backbone.safetensors"), "--out", "-o", help="Backbone file to write."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """Write the backbone weights (timm state_dict keys) and OUT.json (name, kwargs, stem, mean/std, size)."""
    from ssl_cli.export import export_backbone

    summary = export_backbone(checkpoint, output)
    if as_json:
        emit_json(summary)
        return
    out.print(result_table("export", summary))
    if summary["small_stem"]:
        err.print(f"small stem: load with ssl_cli.load_backbone('{summary['backbone']}')")
    else:
        err.print(
            f"load with timm.create_model('{summary['architecture']}', num_classes=0, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file='{summary['backbone']}'))"
        )
