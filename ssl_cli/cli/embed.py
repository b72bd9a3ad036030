"""``ssl embed``: the backbone's output for every image of a folder, with the image paths (and labels), to a file."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import typer

from ssl_cli.cli.console import CountProgress, emit_json, handles_errors, result_table, stdout
from ssl_cli.cli.evaluate import (
    CACHE_DIR,
    CHECKPOINT,
    DEVICE,
    JSON,
    NO_CACHE,
    OUTPUT_VIEW,
    QUIET,
    WORKERS,
    feature_cache,
)


@handles_errors
def embed(
    checkpoint: Path = CHECKPOINT,
    data: Path = typer.Option(
        ..., "--data", "-d", help="Image folder (class sub-folders give labels; otherwise images anywhere below it)."
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="FILE.safetensors (tensors embeddings, labels; paths and classes in the metadata) or FILE.npy "
        "(the N x D array, with paths, labels and classes in FILE.json).",
    ),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Feature extraction batch size."),
    device: str = DEVICE,
    num_workers: int = WORKERS,
    cache_dir: Path = CACHE_DIR,
    no_cache: bool = NO_CACHE,
    output_view: str = OUTPUT_VIEW,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Embed every image of --data with the checkpoint's backbone (the features kNN uses) and write them to --out."""
    from ssl_cli.eval.embed import embed_folder

    bar: CountProgress | None = None
    with ExitStack() as stack:

        def start(total: int) -> None:
            nonlocal bar
            bar = stack.enter_context(CountProgress("embeddings", total))

        summary = embed_folder(
            checkpoint,
            data,
            out,
            batch_size=batch_size,
            num_workers=num_workers if num_workers is not None else "auto",
            device=device,
            cache=feature_cache(cache_dir, no_cache, quiet),
            progress=lambda n: bar.advance(n) if bar is not None else None,
            on_start=None if quiet else start,
            output_view=output_view,
        )
    if as_json:
        emit_json(summary)
        return
    rows = {
        "images": summary["count"],
        "dimensions": summary["dim"],
        "labels": f"{summary['classes']} classes" if summary["labeled"] else "none (no class sub-folders)",
        "files": ", ".join(summary["files"]),
        "features": "from the cache" if summary["cached"] else "extracted",
    }
    stdout.print(result_table(f"embeddings  {checkpoint}", rows))
