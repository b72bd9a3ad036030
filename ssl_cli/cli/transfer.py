"""``ssl transfer``: fine-tune a checkpoint's backbone end to end with a fresh classifier (``ssl_cli.transfer.run``)."""

from __future__ import annotations

from pathlib import Path

import typer

from ssl_cli.cli.console import ProgressReporter, emit_json, err, handles_errors, result_table, stdout
from ssl_cli.cli.evaluate import CHECKPOINT, DEVICE, JSON, QUIET, RANDOM_INIT, TRAIN, VAL, WORKERS
from ssl_cli.errors import Interrupted


@handles_errors
def transfer(
    checkpoint: str = CHECKPOINT,
    train: str = TRAIN,
    val: str = VAL,
    out: Path = typer.Option(..., "--out", "-o", help="Result folder: new or empty (a re-run of the same run)."),
    optim: str = typer.Option(
        "sgd", "--optim", "--optimizer", help="sgd (momentum 0.9, Nesterov; SimCLR) | adamw (ViTs); as optim.name."
    ),
    lr: float = typer.Option(
        None, "--lr", help="Learning rate at batch 256, scaled by batch/256 (default: sgd 0.05, adamw 5e-4)."
    ),
    weight_decay: float = typer.Option(
        None, "--weight-decay", help="Weight decay, none on biases / norms / embeddings (default: sgd 0, adamw 0.05)."
    ),
    epochs: int = typer.Option(30, "--epochs", help="Fine-tuning epochs over the labeled images."),
    warmup_epochs: float = typer.Option(0.0, "--warmup-epochs", help="Linear warm-up, then cosine decay per step."),
    batch_size: int = typer.Option(256, "--batch-size", help="Batch size."),
    layer_decay: float = typer.Option(
        1.0, "--layer-decay", help="Layer-wise lr decay: layer i gets lr x d^(L-i) (1 = off; ViTs: 0.65-0.75)."
    ),
    freeze: int = typer.Option(0, "--freeze", help="Freeze the first K layer groups (0 = stem / embeddings)."),
    label_fraction: float = typer.Option(
        None,
        "--label-fraction",
        help="Train on a class-balanced fraction F of the labels, 0 < F <= 1 (SimCLR v2: 0.01, 0.1); "
        "the subset is saved to OUT/label_subset.json.",
    ),
    label_subset: Path = typer.Option(
        None, "--label-subset", help="Train on exactly the images of a saved label_subset.json."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed (label subset, classifier init, augmentation, order)."),
    device: str = DEVICE,
    num_workers: int = WORKERS,
    random_init: bool = RANDOM_INIT,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Fine-tune the backbone end to end with a new linear classifier on --train, evaluate on --val.

    Writes OUT/model.safetensors (timm keys + classifier), metrics.json, metrics.jsonl, confusion_matrix.png.
    """
    from ssl_cli.transfer.finetune import FinetuneConfig
    from ssl_cli.transfer.run import run_transfer

    if (train is None or val is None) and not quiet:
        err.print("no --train/--val: fine-tuning on the built-in demo data", markup=False)
    cfg = FinetuneConfig(optim, lr, weight_decay, epochs, warmup_epochs, batch_size, layer_decay, freeze, seed)
    with ProgressReporter(epochs, quiet=quiet) as reporter:
        try:
            summary = run_transfer(
                checkpoint,
                train,
                val,
                out,
                cfg,
                label_fraction=label_fraction,
                label_subset=label_subset,
                random_init=random_init,
                device=device,
                num_workers=num_workers if num_workers is not None else "auto",
                reporter=reporter,
                log=reporter.log,
            )
        except KeyboardInterrupt:  # there is no --resume: the same command starts the run again
            raise Interrupted(
                f"interrupted; {out} is incomplete (no metrics.json): the same command starts it again"
            ) from None
    if as_json:
        emit_json(summary)
        return
    stdout.print(result_table(f"transfer  {checkpoint}{'  (random init)' if random_init else ''}", summary))
