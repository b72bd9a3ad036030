"""``ssl knn`` and ``ssl linear-probe`` (alias ``probe``): evaluate a checkpoint's frozen backbone.

Features go through the on-disk cache (``ssl_cli.eval.cache``): a second evaluation of the same checkpoint on the
same images reads them instead of running the backbone (``--no-cache`` turns it off, ``--cache-dir`` moves it).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ssl_cli.cli.console import CountProgress, emit_json, err, handles_errors, result_table, stdout

# Options both evaluation commands take, defined once so their names and help stay the same.
CHECKPOINT = typer.Argument(..., help="Training checkpoint or exported backbone (.safetensors).")
TRAIN = typer.Option(None, "--train", help="Labeled image folder (class sub-folders) or dataset name; omitted: demo.")
VAL = typer.Option(None, "--val", help="Labeled image folder or dataset name (test split); omitted: demo test data.")
DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N.")
WORKERS = typer.Option(None, "--num-workers", min=0, help="Data loader workers (default: auto).")
RANDOM_INIT = typer.Option(False, "--random-init", help="Same architecture, random weights (baseline).")
JSON = typer.Option(False, "--json", help="One JSON object on stdout.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress on stderr.")
CACHE_DIR = typer.Option(
    None,
    "--cache-dir",
    help="Feature cache folder (default: $XDG_CACHE_HOME/ssl/features, else ~/.cache/ssl/features).",
)
NO_CACHE = typer.Option(False, "--no-cache", help="Extract features afresh and do not store them.")
OUTPUT_VIEW = typer.Option(
    None,
    "--output-view",
    help="CMC: evaluate the features of one colour view's network (e.g. L, ab) or all (every view's, concatenated). "
    "Default: the checkpoint's own (all for a default run).",
    show_default=False,
)


def feature_cache(cache_dir: Path | None, no_cache: bool, quiet: bool):
    """The feature cache the options ask for (None with --no-cache); its notes go to stderr unless --quiet."""
    from ssl_cli.eval.cache import FeatureCache, default_cache_dir

    if no_cache:
        return None
    log = None if quiet else (lambda message: err.print(message, markup=False))
    return FeatureCache(cache_dir if cache_dir is not None else default_cache_dir(), log=log)


def _setup(
    checkpoint: str,
    train: str | None,
    val: str | None,
    device: str,
    random_init: bool,
    quiet: bool,
    cache_dir: Path | None = None,
    no_cache: bool = False,
    output_view: str | None = None,
):
    """Backbone and labeled splits for an evaluation command (demo data when --train / --val are omitted)."""
    from ssl_cli.eval.run import setup

    if (train is None or val is None) and not quiet:
        err.print("no --train/--val: evaluating on the built-in demo data", markup=False)
    cache = feature_cache(cache_dir, no_cache, quiet)
    return setup(checkpoint, train, val, device, random_init, cache=cache, output_view=output_view)


@handles_errors
def knn(
    checkpoint: str = CHECKPOINT,
    train: str = TRAIN,
    val: str = VAL,
    k: list[int] = typer.Option([200], "--k", min=1, help="Neighbours; repeat for several k in one pass."),
    temperature: float = typer.Option(0.07, "--temperature", min=1e-6, help="Vote weight exp(sim / T)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Feature extraction batch size."),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help="Storage of the train bank: float32, float16 (half the memory; similarities still in float32) or "
        "auto (float16 when the bank would take over 1 GiB in float32).",
    ),
    device: str = DEVICE,
    num_workers: int = WORKERS,
    random_init: bool = RANDOM_INIT,
    output_view: str = OUTPUT_VIEW,
    cache_dir: Path = CACHE_DIR,
    no_cache: bool = NO_CACHE,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Weighted kNN accuracy (cosine similarity, votes exp(sim/T)) of frozen features; top-1/top-5 as fractions."""
    from ssl_cli.errors import SSLError
    from ssl_cli.eval.knn import BANK_DTYPES
    from ssl_cli.eval.run import run_knn

    if dtype not in ("auto", *BANK_DTYPES):
        raise SSLError(f"--dtype {dtype}: valid values are auto, {', '.join(BANK_DTYPES)}")
    s = _setup(checkpoint, train, val, device, random_init, quiet, cache_dir, no_cache, output_view)
    with CountProgress("features", len(s.train) + len(s.val)) as bar:
        result = run_knn(
            s,
            list(k),
            temperature,
            batch_size,
            num_workers if num_workers is not None else "auto",
            bar.advance,
            dtype=dtype,
        )
    result["random_init"] = random_init
    if output_view is not None:
        result["output_view"] = output_view
    if s.meta.get("readout"):
        result["readout"] = s.meta["readout"]
    if as_json:
        emit_json(result)
        return
    rows = {f"top1 (k={kk})": v["top1"] for kk, v in result["by_k"].items()}
    rows.update({f"top5 (k={kk})": v["top5"] for kk, v in result["by_k"].items()})
    view = f"  (output view {output_view})" if output_view is not None else ""
    view += _readout_note(s.meta.get("readout"))
    stdout.print(result_table(f"kNN  {checkpoint}{view}{'  (random init)' if random_init else ''}", rows))


def _readout_note(readout: dict | None) -> str:
    """A title's note on CPC v2's readout: the features are the mean over a patch grid."""
    if not readout:
        return ""
    g = readout.get("grid")
    return f"  (mean over {f'a {g}x{g}' if g else 'the'} grid of {readout['patch']} px patches)"


def _sweep_table(result: dict) -> Table:
    """One row per swept pair (holdout top-5 is in --json); the chosen pair marked."""
    table = Table(
        title=f"sweep: chosen on {result['holdout_size']} held-out --train images "
        f"({result['holdout_fraction']:g}), trained on {result['train_size']}",
        title_justify="left",
    )
    for column in ("lr", "wd", "holdout top1", "holdout loss", "train top1", ""):
        table.add_column(column, justify="right" if column else "left", no_wrap=True)
    for h in result["sweep"]:
        table.add_row(
            f"{h['lr']:g}",
            f"{h['weight_decay']:g}",
            f"{h['holdout_top1']:.4f}",
            f"{h['holdout_loss']:.4f}",
            f"{h['train_top1']:.4f}",
            "chosen" if h["selected"] else "",
        )
    return table


@handles_errors
def linear_probe(
    checkpoint: str = CHECKPOINT,
    train: str = TRAIN,
    val: str = VAL,
    epochs: int = typer.Option(100, "--epochs", min=1, help="Classifier training epochs."),
    lr: list[float] = typer.Option(
        [0.1],
        "--lr",
        help="SGD learning rate at batch 256 (scaled linearly); repeat to sweep several in one pass.",
    ),
    weight_decay: list[float] = typer.Option(
        [0.0], "--weight-decay", help="Classifier weight decay; repeat to sweep several (every lr x weight decay)."
    ),
    holdout_fraction: float = typer.Option(
        None,
        "--holdout-fraction",
        help="Share of --train held out (class-balanced, seeded) to choose the swept pair on; "
        "default 0.1 with several pairs, 0 with one.",
    ),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Batch size."),
    augment: bool = typer.Option(
        False,
        "--augment",
        help="Train on augmented images (random resized crop + flip) instead of cached features (one lr / wd).",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    device: str = DEVICE,
    num_workers: int = WORKERS,
    random_init: bool = RANDOM_INIT,
    output_view: str = OUTPUT_VIEW,
    cache_dir: Path = CACHE_DIR,
    no_cache: bool = NO_CACHE,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Linear classifier on the frozen backbone (SGD, cosine schedule); top-1/top-5 on --val as fractions.

    Several --lr / --weight-decay values train one classifier per pair in one pass over the cached features; the
    pair with the best top-1 on a held-out part of --train is reported (DINO / solo-learn / VISSL protocol).
    """
    from ssl_cli.eval.run import run_probe

    s = _setup(checkpoint, train, val, device, random_init, quiet, cache_dir, no_cache, output_view)
    workers = num_workers if num_workers is not None else "auto"
    n_feat = len(s.val) + (0 if augment else len(s.train))
    with CountProgress("features", n_feat) as feats, CountProgress("probe epochs", epochs) as ep:
        result = run_probe(
            s,
            epochs,
            list(lr),
            list(weight_decay),
            batch_size,
            augment,
            workers,
            seed,
            progress=lambda e, loss: ep.advance(),
            feature_progress=feats.advance,
            holdout_fraction=holdout_fraction,
        )
    result["random_init"] = random_init
    if output_view is not None:
        result["output_view"] = output_view
    if s.meta.get("readout"):
        result["readout"] = s.meta["readout"]
    if as_json:
        emit_json(result)
        return
    readout = result.pop("readout", None)
    if "sweep" in result:
        stdout.print(_sweep_table(result))
        shown = {k: result[k] for k in ("top1", "top5", "train_top1", "lr", "weight_decay", "epochs")}
        stdout.print(result_table("linear probe: the chosen pair on --val", shown))
        return
    stdout.print(result_table(f"linear probe  {checkpoint}{_readout_note(readout)}", result))
