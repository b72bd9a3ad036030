"""``ssl knn`` and ``ssl linear-probe`` (alias ``probe``): evaluate a checkpoint's frozen backbone."""

from __future__ import annotations

import typer

from ssl_cli.cli.console import CountProgress, emit_json, err, handles_errors, out, result_table

# Options both evaluation commands take, defined once so their names and help stay the same.
CHECKPOINT = typer.Argument(..., help="Training checkpoint or exported backbone (.safetensors).")
TRAIN = typer.Option(None, "--train", help="Labeled image folder (class sub-folders) or dataset name; omitted: demo.")
VAL = typer.Option(None, "--val", help="Labeled image folder or dataset name (test split); omitted: demo test data.")
DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N.")
WORKERS = typer.Option(None, "--num-workers", min=0, help="Data loader workers (default: auto).")
RANDOM_INIT = typer.Option(False, "--random-init", help="Same architecture, random weights (baseline).")
JSON = typer.Option(False, "--json", help="One JSON object on stdout.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress on stderr.")


def _setup(checkpoint: str, train: str | None, val: str | None, device: str, random_init: bool, quiet: bool):
    """Backbone and labeled splits for an evaluation command (demo data when --train / --val are omitted)."""
    from ssl_cli.eval.run import setup

    if (train is None or val is None) and not quiet:
        err.print("no --train/--val: evaluating on the built-in demo data", markup=False)
    return setup(checkpoint, train, val, device, random_init)


@handles_errors
def knn(
    checkpoint: str = CHECKPOINT,
    train: str = TRAIN,
    val: str = VAL,
    k: list[int] = typer.Option([200], "--k", min=1, help="Neighbours; repeat for several k in one pass."),
    temperature: float = typer.Option(0.07, "--temperature", min=1e-6, help="Vote weight exp(sim / T)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Feature extraction batch size."),
    device: str = DEVICE,
    num_workers: int = WORKERS,
    random_init: bool = RANDOM_INIT,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Weighted kNN accuracy (cosine similarity, votes exp(sim/T)) of frozen features; top-1/top-5 as fractions."""
    from ssl_cli.eval.run import run_knn

    s = _setup(checkpoint, train, val, device, random_init, quiet)
    with CountProgress("features", len(s.train) + len(s.val)) as bar:
        result = run_knn(
            s,
            list(k),
            temperature,
            batch_size,
            num_workers if num_workers is not None else "auto",
            bar.advance,
        )
    result["random_init"] = random_init
    if as_json:
        emit_json(result)
        return
    rows = {f"top1 (k={kk})": v["top1"] for kk, v in result["by_k"].items()}
    rows.update({f"top5 (k={kk})": v["top5"] for kk, v in result["by_k"].items()})
    out.print(result_table(f"kNN  {checkpoint}{'  (random init)' if random_init else ''}", rows))


@handles_errors
def linear_probe(
    checkpoint: str = CHECKPOINT,
    train: str = TRAIN,
    val: str = VAL,
    epochs: int = typer.Option(100, "--epochs", min=1, help="Classifier training epochs."),
    lr: float = typer.Option(0.1, "--lr", min=0.0, help="SGD learning rate at batch 256 (scaled linearly)."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", min=0.0, help="Classifier weight decay."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Batch size."),
    augment: bool = typer.Option(
        False,
        "--augment",
        help="Train on augmented images (random resized crop + flip) instead of cached features.",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    device: str = DEVICE,
    num_workers: int = WORKERS,
    random_init: bool = RANDOM_INIT,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Linear classifier on the frozen backbone (SGD, cosine schedule); top-1/top-5 on --val as fractions."""
    from ssl_cli.eval.run import run_probe

    s = _setup(checkpoint, train, val, device, random_init, quiet)
    workers = num_workers if num_workers is not None else "auto"
    n_feat = len(s.val) + (0 if augment else len(s.train))
    with CountProgress("features", n_feat) as feats, CountProgress("probe epochs", epochs) as ep:
        result = run_probe(
            s,
            epochs,
            lr,
            weight_decay,
            batch_size,
            augment,
            workers,
            seed,
            progress=lambda e, loss: ep.advance(),
            feature_progress=feats.advance,
        )
    result["random_init"] = random_init
    if as_json:
        emit_json(result)
        return
    out.print(result_table(f"linear probe  {checkpoint}", result))
