"""``ssl visualize``: the last block's [CLS] self-attention of a ViT checkpoint, one PNG per image (DINO's maps)."""

from __future__ import annotations

from pathlib import Path

import typer

from ssl_cli.cli.console import emit_json, err, handles_errors, result_table, stdout


@handles_errors
def visualize(
    checkpoint: Path = typer.Argument(..., help="Training checkpoint or exported backbone (.safetensors) of a ViT."),
    data: str = typer.Option(..., "--data", "-d", help="An image file, an image folder or a dataset name."),
    num_images: int = typer.Option(4, "--num-images", "-n", help="The first N images, in the folder's sorted order."),
    out: Path = typer.Option(
        None, "--out", "-o", help="Folder for the PNGs (default: <run folder>/attention, else ./attention)."
    ),
    size: int = typer.Option(None, "--size", help="Input size (default: the checkpoint's preprocessing size)."),
    threshold: float = typer.Option(
        None,
        "--threshold",
        help="Also show DINO's masks: the fewest patches holding this share of the attention (e.g. 0.6).",
    ),
    zoom: int = typer.Option(None, "--zoom", help="Enlarge the picture Z times (default: panels of >= 128 px)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
) -> None:
    """Per image: the image, the [CLS] token's last-block attention of every head, and their mean, side by side."""
    from ssl_cli.plots.attention import visualize as run_visualize

    result = run_visualize(
        checkpoint,
        data,
        num_images=num_images,
        out=out,
        size=size,
        threshold=threshold,
        zoom=zoom,
        device=device,
        progress=None if quiet else lambda path: err.print(f"wrote {path}", markup=False),
    )
    if len(result["images"]) < num_images and not quiet:
        err.print(f"note: --data {data} has only {len(result['images'])} image(s)", markup=False)
    if as_json:
        emit_json({"images": result["images"], "heads": result["heads"], "grid": result["grid"]})
        return
    gh, gw = result["grid"]
    rows = {
        "images": len(result["images"]),
        "folder": result["out"],
        "heads": result["heads"],
        "patch grid": f"{gh} x {gw}",
        "input size": result["size"],
        "panels": f"image, {result['heads']} heads, mean" + (", masks below" if threshold is not None else ""),
    }
    stdout.print(result_table(f"attention  {checkpoint}", rows))
