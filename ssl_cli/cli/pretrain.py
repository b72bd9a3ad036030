"""``ssl pretrain``: train a backbone with a recipe on a folder, a dataset name or the built-in demo data."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from ssl_cli.cli.console import ProgressReporter, emit_json, err, handles_errors, result_table, stdout
from ssl_cli.cli.flags import recipe_overrides


@contextlib.contextmanager
def _interrupted_says_resume():
    """Ctrl-C before training starts, or a second one while it stops (the first stops after a checkpoint)."""
    from ssl_cli.errors import Interrupted

    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted("interrupted; checkpoints written so far are kept (continue with --resume)") from None


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
        "kNN every monitor.knn.every epochs and an online linear classifier; --data must be labeled too.",
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<recipe>, never reused)."),
    backbone: str = typer.Option(None, "--backbone", help="timm model name (recipe key backbone.name)."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Epochs (train.epochs)."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Batch size (train.batch_size)."),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (train.device)."),
    seed: int = typer.Option(None, "--seed", help="Random seed (train.seed)."),
    num_workers: int = typer.Option(None, "--num-workers", min=0, help="Data loader workers (data.num_workers)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from checkpoints/last."),
    extend_to: int = typer.Option(
        None,
        "--extend-to",
        min=1,
        help="With --resume: train the run on to N epochs, more than it planned; from where it resumes, the schedules "
        "follow the recipe planned for N epochs (a new segment, recorded in the checkpoints).",
    ),
    overrides: list[str] = typer.Option([], "--set", help="Override any recipe key: --set optim.lr=0.06 (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout at the end."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
) -> None:
    """Pretrain a backbone with a self-supervised recipe; writes checkpoints/last.safetensors in the run folder."""
    # torch-heavy imports stay inside the command, so `ssl --help` and `ssl --version` start fast
    from ssl_cli.distributed import env_rank
    from ssl_cli.train.launch import run_pretraining

    quiet = quiet or env_rank() != 0  # under torchrun only rank 0 talks: progress, notes, the result
    typed = recipe_overrides(
        backbone=backbone, epochs=epochs, batch_size=batch_size, device=device, seed=seed, num_workers=num_workers
    )
    with ProgressReporter(quiet=quiet) as reporter, _interrupted_says_resume():
        result = run_pretraining(
            recipe,
            data,
            out,
            resume=resume,
            overrides=[*typed, *overrides],
            val=val,
            extend_to=extend_to,
            reporter=reporter,
            log=None if quiet else (lambda line: err.print(line, markup=False)),
        )
    if result is None:  # not the main process
        return
    if as_json:
        emit_json(result.to_dict())
    else:
        stdout.print(result_table("pretrain", result.to_dict()))
