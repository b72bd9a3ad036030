"""``ssl bench``: a recipe's training step against its backbone's own speed on this machine."""

from __future__ import annotations

import typer

from ssl_cli.cli.console import emit_json, err, handles_errors, result_table, stdout
from ssl_cli.cli.flags import recipe_overrides
from ssl_cli.config import load_recipe
from ssl_cli.errors import RecipeError

# without --data the demo's 2,560 32x32 images: a short measurement (about a minute on 2 CPU cores for simclr-cifar
# with its own CIFAR stem), still after a warm-up iteration; --batch-size / --steps / --warmup-steps / --set win
DEMO_BATCH_SIZE, DEMO_STEPS, DEMO_WARMUP = 64, 8, 2


@handles_errors
def bench(
    recipe: str = typer.Option(None, "--recipe", "-r", help="Built-in recipe name (ssl recipes list) or .toml path."),
    data: str = typer.Option(None, "--data", "-d", help="Image folder or dataset name; omitted: the demo data."),
    backbone: str = typer.Option(None, "--backbone", help="timm model name (recipe key backbone.name)."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Batch size (train.batch_size)."),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (train.device)."),
    num_workers: int = typer.Option(None, "--num-workers", min=0, help="Data loader workers (data.num_workers)."),
    steps: int = typer.Option(
        None, "--steps", min=1, help=f"Timed iterations of each measurement (default 20; demo data: {DEMO_STEPS})."
    ),
    warmup_steps: int = typer.Option(
        None,
        "--warmup-steps",
        "--warmup",  # its name before 0.1 (a warm-up in steps, where ssl transfer's --warmup-epochs counts epochs)
        min=0,
        help=f"Untimed iterations before each measurement (default 3; demo: {DEMO_WARMUP}).",
    ),
    overrides: list[str] = typer.Option([], "--set", help="Override any recipe key: --set data.augment=batch."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """Backbone-only ceiling, data-path and full-step throughput (images/s), their ratios and peak memory.

    Without --data: the built-in demo images with a short measurement (batch size 64, 8 timed steps after 2 warm-up
    steps, the recipe's own backbone and stem: about 40 s for simclr-cifar on 2 CPU cores)."""
    from ssl_cli.train.bench import bench as run_bench

    typed = recipe_overrides(backbone=backbone, batch_size=batch_size, device=device, num_workers=num_workers)
    if recipe is None:
        raise RecipeError("pass --recipe NAME or --recipe FILE.toml (see: ssl recipes list)")
    demo = [("train.batch_size", DEMO_BATCH_SIZE)] if data is None else []
    resolved = load_recipe(recipe, [*demo, *typed, *overrides])
    if data is None:
        steps, warmup_steps = steps or DEMO_STEPS, DEMO_WARMUP if warmup_steps is None else warmup_steps
        err.print(
            f"no --data: the built-in demo set (2,560 generated 32x32 images), a short measurement: batch size "
            f"{resolved.train.batch_size}, {steps} timed steps after {warmup_steps} warm-up step(s)",
            markup=False,
        )
    result = run_bench(resolved, data, steps=steps or 20, warmup_steps=3 if warmup_steps is None else warmup_steps)
    if as_json:
        emit_json(result)
    else:
        stdout.print(result_table("bench", result))
