"""``ssl neighbors``: retrieval grids, each query image followed by its nearest bank images (a PNG)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import typer

from ssl_cli.cli.console import CountProgress, emit_json, err, handles_errors, result_table, stdout
from ssl_cli.cli.evaluate import OUTPUT_VIEW


@handles_errors
def neighbors(
    checkpoint: Path = typer.Argument(..., help="Training checkpoint or exported backbone (.safetensors)."),
    data: str = typer.Option(..., "--data", "-d", help="The bank: image folder (class sub-folders) or dataset name."),
    queries: str = typer.Option(
        None, "--queries", help="Image folder or dataset name to draw queries from (default: the bank itself)."
    ),
    num_queries: int = typer.Option(8, "--num-queries", help="Queries: a class-balanced seeded sample, one row each."),
    k: int = typer.Option(8, "--k", help="Neighbours per query."),
    out: Path = typer.Option(
        None,
        "--out",
        "-o",
        help="PNG file (default: <run>/neighbors.png for a run's checkpoint, else ./neighbors.png).",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed (which queries)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Feature extraction batch size."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    num_workers: int = typer.Option(None, "--num-workers", min=0, help="Data loader workers (default: auto)."),
    random_init: bool = typer.Option(False, "--random-init", help="Same architecture, random weights (baseline)."),
    output_view: str = OUTPUT_VIEW,
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout: queries, neighbours, similarities."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
) -> None:
    """Each query, then its K most cosine-similar bank images: green frame = same class, red = another."""
    from ssl_cli.plots.files import check_out, default_out
    from ssl_cli.plots.neighbors import retrieval_grid

    folders = [data] + ([queries] if queries else [])
    target = check_out(out or default_out(checkpoint, "neighbors.png"), inputs=[checkpoint], folders=folders)
    bar: CountProgress | None = None
    with ExitStack() as stack:

        def start(total: int) -> None:
            nonlocal bar
            bar = stack.enter_context(CountProgress("features", total))

        result = retrieval_grid(
            checkpoint,
            data,
            target,
            queries=queries,
            num_queries=num_queries,
            k=k,
            seed=seed,
            batch_size=batch_size,
            num_workers=num_workers if num_workers is not None else "auto",
            device=device,
            random_init=random_init,
            output_view=output_view,
            progress=lambda n: bar.advance(n) if bar else None,
            on_total=None if quiet else start,
        )
    if not quiet:
        err.print(f"wrote {target}", markup=False)
        if len(result["queries"]) < num_queries:
            err.print(f"note: only {len(result['queries'])} query image(s) to draw from", markup=False)
    if as_json:
        emit_json(result)
        return
    rows = {"picture": result["out"], "queries": len(result["queries"]), "k": k, "bank": result["bank"]}
    if result["precision"] is not None:
        rows["neighbours of the query's class"] = result["precision"]
    stdout.print(result_table(f"neighbors  {checkpoint}{'  (random init)' if random_init else ''}", rows))
