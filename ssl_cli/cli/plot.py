"""``ssl plot curves|embedding``: training curves of runs, a 2-D map of a backbone's features (PNG files)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import typer

from ssl_cli.cli.console import CountProgress, emit_json, err, handles_errors, result_table, stdout
from ssl_cli.cli.evaluate import OUTPUT_VIEW
from ssl_cli.errors import DataError

app = typer.Typer(help="Pictures: training curves of runs, a 2-D map of a backbone's features.", no_args_is_help=True)

OUT = "--out"
DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N.")
WORKERS = typer.Option(None, "--num-workers", min=0, help="Data loader workers (default: auto).")
RANDOM_INIT = typer.Option(False, "--random-init", help="Same architecture, random weights (baseline).")
JSON = typer.Option(False, "--json", help="One JSON object on stdout.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress on stderr.")


@app.command("curves")
@handles_errors
def curves(
    runs: list[Path] = typer.Argument(
        ..., help="Run folders of ssl pretrain (or their metrics.jsonl); several overlay."
    ),
    out: Path = typer.Option(
        None, OUT, "-o", help="PNG file (default: RUN/curves.png for one run, ./curves.png for several)."
    ),
    x_axis: str = typer.Option("epoch", "--x-axis", help="epoch | step."),
    width: int = typer.Option(None, "--width", help="Picture width in pixels (default: by panel count)."),
    height: int = typer.Option(None, "--height", help="Picture height in pixels (default: by panel count)."),
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Loss, learning rate, accuracy monitors and the method's metrics per epoch, one panel each; runs overlaid."""
    from ssl_cli.plots.curves import plot_curves, read_runs
    from ssl_cli.plots.files import check_out

    metrics = read_runs(list(runs))
    if out is None:
        out = metrics[0].path.parent / "curves.png" if len(metrics) == 1 else Path("curves.png")
    target = check_out(out, inputs=[m.path for m in metrics])
    result = plot_curves(metrics, target, x_axis=x_axis, width=width, height=height)
    if not quiet:
        err.print(f"wrote {target}", markup=False)
    if as_json:
        emit_json(result)
        return
    rows = {"picture": result["out"], "size": "{} x {}".format(*result["size"])}
    rows["panels"] = ", ".join(p["title"] for p in result["panels"])
    for r in result["runs"]:
        last = r["last"]
        shown = {k: v for k, v in last.items() if k not in ("epoch", "step", "seconds", "images_per_second")}
        epochs = f"epoch {int(last['epoch'])}" if "epoch" in last else f"{r['records']} records"
        rows[r["name"]] = epochs + "  " + "  ".join(f"{k} {v:.4g}" for k, v in shown.items())
    stdout.print(result_table("training curves", rows))


@app.command("embedding")
@handles_errors
def embedding(
    checkpoint: Path = typer.Argument(
        ..., help="Training checkpoint or exported backbone (.safetensors), or an ssl embed file (then no --data)."
    ),
    data: str = typer.Option(
        None, "--data", "-d", help="Image folder (class sub-folders give colours) or dataset name."
    ),
    out: Path = typer.Option(
        None, OUT, "-o", help="PNG file (default: <run>/embedding.png for a run's checkpoint, else ./embedding.png)."
    ),
    num_images: int = typer.Option(
        2000, "--num-images", "--max-images", help="At most N images, a class-balanced seeded sample."
    ),
    method: str = typer.Option("tsne", "--method", help="tsne (PCA to 50 dimensions, then t-SNE) | pca."),
    perplexity: float = typer.Option(30.0, "--perplexity", help="t-SNE perplexity (at most (N - 1) / 3 is used)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (the sample and t-SNE)."),
    width: int = typer.Option(1000, "--width", help="Picture width in pixels."),
    height: int = typer.Option(800, "--height", help="Picture height in pixels."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Feature extraction batch size."),
    device: str = DEVICE,
    num_workers: int = WORKERS,
    random_init: bool = RANDOM_INIT,
    output_view: str = OUTPUT_VIEW,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Backbone features of a class-balanced sample, mapped to 2-D (t-SNE or PCA), coloured by label."""
    from ssl_cli.plots.embedding import METHODS, embedding_map
    from ssl_cli.plots.files import check_out, default_out

    if method not in METHODS:  # before loading anything
        raise DataError(f"--method {method}: unknown; valid: {', '.join(METHODS)}")
    target = check_out(
        out or default_out(checkpoint, "embedding.png"), inputs=[checkpoint], folders=[data] if data else []
    )
    bar: CountProgress | None = None
    with ExitStack() as stack:

        def start(total: int) -> None:
            nonlocal bar
            bar = stack.enter_context(CountProgress("features", total))

        result = embedding_map(
            checkpoint,
            data,
            target,
            num_images=num_images,
            method=method,
            perplexity=perplexity,
            seed=seed,
            batch_size=batch_size,
            num_workers=num_workers if num_workers is not None else "auto",
            device=device,
            random_init=random_init,
            output_view=output_view,
            width=width,
            height=height,
            progress=lambda n: bar.advance(n) if bar else None,
            on_total=None if quiet else start,
            log=None if quiet else lambda message: err.print(message, markup=False),
        )
    if not quiet:
        err.print(f"wrote {target}", markup=False)
    if as_json:
        emit_json(result)
        return
    rows = {"picture": result["out"], "method": result["method"], "images": result["images"]}
    if result["nn_agreement_features"] is not None:
        rows["same-class nearest neighbour, features"] = result["nn_agreement_features"]
        rows["same-class nearest neighbour, 2-D map"] = result["nn_agreement_2d"]
    if "explained_variance" in result:
        rows["variance of PC 1, PC 2"] = ", ".join(f"{v:.3f}" for v in result["explained_variance"])
    stdout.print(result_table(f"embedding  {checkpoint}{'  (random init)' if random_init else ''}", rows))
