"""``ssl bench``: a recipe's training step against its backbone's own speed on this machine."""

from __future__ import annotations

import typer

from ssl_cli.cli.console import emit_json, handles_errors, out, result_table
from ssl_cli.config import load_recipe
from ssl_cli.errors import RecipeError


@handles_errors
def bench(
    recipe: str = typer.Option(None, "--recipe", "-r", help="Built-in recipe name (ssl recipes list) or .toml path."),
    data: str = typer.Option(None, "--data", "-d", help="Image folder or dataset name; omitted: the demo data."),
    backbone: str = typer.Option(None, "--backbone", help="timm model name (recipe key backbone.name)."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Batch size (train.batch_size)."),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (train.device)."),
    num_workers: int = typer.Option(None, "--num-workers", min=0, help="Data loader workers (data.num_workers)."),
    steps: int = typer.Option(20, "--steps", min=1, help="Timed iterations of each measurement."),
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed iterations before each measurement."),
    overrides: list[str] = typer.Option([], "--set", help="Override any recipe key: --set data.augment=batch."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """Backbone-only ceiling, data-path and full-step throughput (images/s), their ratios and peak memory."""
    from ssl_cli.bench import bench as run_bench

    flags = {
        "backbone.name": backbone,
        "train.batch_size": batch_size,
        "train.device": device,
        "data.num_workers": num_workers,
    }
    if recipe is None:
        raise RecipeError("pass --recipe NAME or --recipe FILE.toml (see: ssl recipes list)")
    resolved = load_recipe(recipe, [*((k, v) for k, v in flags.items() if v is not None), *overrides])
    result = run_bench(resolved, data, steps=steps, warmup=warmup)
    if as_json:
        emit_json(result)
    else:
        out.print(result_table("bench", result))
