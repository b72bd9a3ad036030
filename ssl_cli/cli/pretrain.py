"""``ssl pretrain``: train a backbone with a recipe on a folder, a dataset name or the built-in demo data."""

from __future__ import annotations

from pathlib import Path

import typer

from ssl_cli.cli.console import ProgressReporter, emit_json, err, handles_errors, out, result_table
from ssl_cli.config import load_recipe
from ssl_cli.errors import RecipeError
from ssl_cli.train.run_dir import RunDir, default_run_dir


@handles_errors
def pretrain(
    recipe: str = typer.Option(None, "--recipe", "-r", help="Built-in recipe name (ssl recipes list) or .toml path."),
    data: str = typer.Option(
        None,
        "--data",
        "-d",
        help="Image folder, or cifar10 / cifar100 / stl10[:split]; omitted: built-in demo data.",
    ),
    val: str = typer.Option(
        None,
        "--val",
        help="Labeled held-out images (folder with class sub-folders, dataset name, demo:test): online monitors, "
        "kNN every monitor.knn_every epochs and an online linear classifier; --data must be labeled too.",
    ),
    out_dir: Path = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<recipe>, never reused)."),
    backbone: str = typer.Option(None, "--backbone", help="timm model name (recipe key backbone.name)."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Epochs (train.epochs)."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Batch size (train.batch_size)."),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (train.device)."),
    seed: int = typer.Option(None, "--seed", help="Random seed (train.seed)."),
    num_workers: int = typer.Option(None, "--num-workers", min=0, help="Data loader workers (data.num_workers)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from checkpoints/last."),
    overrides: list[str] = typer.Option([], "--set", help="Override any recipe key: --set optim.lr=0.06 (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout at the end."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
) -> None:
    """Pretrain a backbone with a self-supervised recipe; writes checkpoints/last.safetensors in the run folder."""
    # torch-heavy imports stay inside the command, so `ssl --help` and `ssl --version` start fast
    from ssl_cli.distributed import agree, env_rank, init_from_env, launched_by_torchrun, shutdown
    from ssl_cli.train.checkpoint import read_checkpoint
    from ssl_cli.train.pretrain import demo_overrides
    from ssl_cli.train.pretrain import pretrain as run_pretrain

    main_process = env_rank() == 0  # under torchrun only rank 0 talks: progress, notes, the result
    quiet = quiet or not main_process

    flags = {
        "backbone.name": backbone,
        "train.epochs": epochs,
        "train.batch_size": batch_size,
        "train.device": device,
        "train.seed": seed,
        "data.num_workers": num_workers,
    }
    typed = [(k, v) for k, v in flags.items() if v is not None]
    if resume:
        if out_dir is None:
            raise RecipeError("--resume needs --out: the run folder to continue")
        run = RunDir(out_dir)
        if not run.last.is_file():
            raise RecipeError(f"--resume: no checkpoint to resume at {run.last}")
        # the run folder's recipe.toml is the resolved recipe of the first run (demo settings included)
        resolved = load_recipe(recipe or str(run.root / "recipe.toml"), [*typed, *overrides])
        saved_data = read_checkpoint(run.last).meta["data"]
        if data is None:
            data = saved_data.get("spec")
        if val is None:
            val = saved_data.get("val")
    else:
        if recipe is None:
            raise RecipeError("pass --recipe NAME or --recipe FILE.toml (see: ssl recipes list)")
        pre = []
        if data is None:
            base = load_recipe(recipe)
            pre = demo_overrides(base.method.name, base)
        resolved = load_recipe(recipe, [*pre, *typed, *overrides])
        if data is None and not quiet:
            err.print(
                "no --data: training on the built-in demo set (2,560 generated 32x32 images); demo settings: "
                + ", ".join(f"{k}={v}" for k, v in pre),
                markup=False,
            )
    if launched_by_torchrun():  # one process group for the folder choice and the training
        init_from_env(resolved.train.device)
    # a new folder is picked on rank 0, so every process writes into the same one
    run_dir = out_dir or agree(default_run_dir(resolved.recipe.name or "run"))
    try:
        with ProgressReporter(resolved.train.epochs, quiet=quiet) as reporter:
            result = run_pretrain(resolved, data, run_dir, resume=resume, reporter=reporter, val=val)
    finally:
        shutdown()
    if not main_process:
        return
    if as_json:
        emit_json(result.to_dict())
    else:
        out.print(result_table("pretrain", result.to_dict()))
