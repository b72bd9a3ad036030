"""``ssl transfer``: fine-tune a checkpoint's backbone end to end on labeled images, evaluate it, write a result folder.

One run: open the checkpoint and both labeled splits (``ssl_cli.eval.run.setup``, as ``ssl knn`` / ``ssl probe``),
optionally keep a class-balanced fraction of the train labels (``ssl_cli.transfer.label_subset``: SimCLR v2's 1% / 10%
protocol), fine-tune with a fresh classifier (``ssl_cli.transfer.finetune``), then score the final model on ``--val``.

The ``--out`` folder receives:

- ``run.json``: the run's settings, written first;
- ``label_subset.json``: the labeled images used, when a fraction or a subset file was given;
- ``metrics.jsonl``: one line per epoch (train loss, learning rate, val top-1, images/s);
- ``model.safetensors`` + ``model.json``: the fine-tuned model with timm's keys (classifier included) and how to
  load it;
- ``confusion_matrix.png``: the row-normalised confusion matrix on ``--val``;
- ``metrics.json``: top-1, top-5, per-class accuracy, the confusion counts, label fraction, hyper-parameters;
  written last, so its presence means the run finished.

``--out`` must be new or empty. A folder that holds a transfer run is only written into again by the same run (the
same ``run.json`` settings: a re-run after an interruption); anything else is refused, so no result is lost.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssl_cli.artifacts.atomic import atomic_write_text
from ssl_cli.augment import eval_transform, train_eval_transform
from ssl_cli.data import ImageSet, scan_folder
from ssl_cli.errors import CheckpointError, DataError
from ssl_cli.eval.metrics import topk_accuracy
from ssl_cli.plots.confusion import confusion_matrix, per_class_accuracy, save_confusion_png
from ssl_cli.transfer.finetune import (
    FinetuneConfig,
    attach_classifier,
    finetune,
    finetuned_meta,
    peak_lr,
    save_finetuned,
    steps_per_epoch,
)
from ssl_cli.transfer.label_subset import (
    SUBSET_FILE,
    LabelSubset,
    check_fraction,
    image_keys,
    read_subset,
    save_subset,
    select_subset,
    subset_from_indices,
    subset_indices,
)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
EPOCHS_FILE = "metrics.jsonl"
MODEL_FILE = "model.safetensors"
CONFUSION_FILE = "confusion_matrix.png"
OUTPUTS = (RUN_FILE, SUBSET_FILE, EPOCHS_FILE, MODEL_FILE, "model.json", CONFUSION_FILE, METRICS_FILE)


def _spec_id(spec: str | None) -> str:
    """A dataset argument as recorded: the absolute folder for a path, else the name (``demo`` when omitted)."""
    if spec is None:
        return "demo"
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} then, {new.get(key)!r} now"
    return ""


def check_out(out: Path, identity: dict[str, Any], ignore: Path | None = None) -> bool:
    """Check ``--out`` may receive this run; True when it already holds this very run (a re-run).

    ``ignore`` (the ``--label-subset`` file, when it lies in ``out``) does not count as content.
    """
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a folder")
    if not out.exists():
        return False
    held = sorted(p.name for p in out.iterdir() if ignore is None or p.resolve() != ignore)
    if not held:
        return False
    previous = None
    if (out / RUN_FILE).is_file():
        try:
            previous = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            previous = None
    if isinstance(previous, dict) and previous.get("config") == identity:
        return True
    if isinstance(previous, dict) and isinstance(previous.get("config"), dict):
        raise CheckpointError(
            f"--out {out} already holds a transfer run with other settings "
            f"({_first_difference(previous['config'], identity)}); choose a new or empty --out"
        )
    shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    raise CheckpointError(
        f"--out {out} is not empty (it holds {shown}); ssl transfer writes into a new or empty folder"
    )


def _train_keys(spec: str | None, images: ImageSet) -> tuple[list[str], Path | None]:
    """Names of the train images (paths relative to the --train folder, or ``#index``) and that folder."""
    root = Path(spec).expanduser() if spec is not None else None
    if root is None or not root.is_dir():
        return image_keys(images, None), None
    # decoded sets (images kept in memory) no longer carry paths: list the folder again, in the same sorted order
    listing = images if images.paths is not None else scan_folder(root)
    if len(listing) != len(images) or not torch.equal(listing.labels, images.labels):
        raise DataError(f"--train {root} changed while it was being read; run again")
    return image_keys(listing, root), root


@dataclass(frozen=True)
class _Plan:
    """A transfer run's checked inputs, before anything is read or written."""

    out: Path
    outputs: dict[str, Path]
    checkpoint: Path
    subset_path: Path | None
    identity: dict[str, Any]
    """What makes two runs the same run (``run.json``): a rerun of it may replace its results."""
    rerun: bool
    saved: LabelSubset | None
    """The ``--label-subset`` file's subset."""


def _plan(
    checkpoint: str, train: str | None, val: str | None, out: str | Path, cfg: FinetuneConfig,
    label_fraction: float | None, label_subset: str | Path | None, random_init: bool,
) -> _Plan:  # fmt: skip
    if label_fraction is not None and label_subset is not None:
        raise DataError("--label-fraction and --label-subset: give one of them (a subset file fixes its fraction)")
    if label_fraction is not None:
        check_fraction(label_fraction)
    out = Path(out).expanduser()
    outputs = {name: (out / name).resolve() for name in OUTPUTS}
    subset_path = Path(label_subset).expanduser().resolve() if label_subset is not None else None
    ckpt_path = Path(checkpoint).expanduser().resolve()
    if ckpt_path in outputs.values():
        raise CheckpointError(f"CHECKPOINT {checkpoint} is an output of this run in --out {out}; choose another --out")
    if subset_path is not None and subset_path in outputs.values() and subset_path != outputs[SUBSET_FILE]:
        raise DataError(f"--label-subset {label_subset} is an output of this run in --out {out}; choose another --out")
    identity = {
        "checkpoint": str(ckpt_path),
        "train": _spec_id(train),
        "val": _spec_id(val),
        "random_init": bool(random_init),
        "label_fraction": label_fraction,
        "label_subset": str(subset_path) if subset_path else None,
        **cfg.to_dict(),
    }
    rerun = check_out(out, identity, ignore=subset_path)
    saved = read_subset(subset_path) if subset_path is not None else None
    return _Plan(out, outputs, ckpt_path, subset_path, identity, rerun, saved)


def _labeled(plan: _Plan, s: Any, train: str | None, fraction: float | None, seed: int, subset_arg: Any):
    """The labelled training images: a new class-balanced subset (``--label-fraction``), the saved one
    (``--label-subset``) or all of them; with the subset (None for all)."""
    classes = s.train.classes
    keys, root = _train_keys(train, s.train)
    if fraction is not None:
        indices = select_subset(s.train.labels, s.num_classes, fraction, seed)
        data_path = str(root.resolve()) if root is not None else _spec_id(train)
        subset = subset_from_indices(indices, keys, s.train.labels, classes, fraction, seed, s.train.name, data_path)
    elif plan.saved is not None:
        indices = subset_indices(plan.saved, keys, s.train.labels, classes, f"--label-subset {subset_arg}")
        subset = plan.saved
    else:
        return None, s.train
    return subset, s.train.subset(indices)


def _check_enough(labeled: ImageSet, cfg: FinetuneConfig, is_subset: bool) -> None:
    """At least one training batch of 2 images (BatchNorm trains on no fewer), before anything is written."""
    if steps_per_epoch(len(labeled), cfg.batch_size) > 0:
        return
    n = len(labeled)
    which = f"the label subset of --train {labeled.name}" if is_subset else f"--train {labeled.name}"
    more = "add images, or take a larger --label-fraction" if is_subset else "add images"
    raise DataError(
        f"{which} has {n} labeled image{'' if n == 1 else 's'}; fine-tuning needs at least 2 (a batch of 2: "
        f"BatchNorm trains on no fewer); {more}"
    )


def _start_out(plan: _Plan, subset: LabelSubset | None, log: Callable[[str], None]) -> Callable[[dict], None]:
    """Write ``run.json`` (and the new subset) into ``--out``, start ``epochs.jsonl``; the per-epoch writer."""
    out = plan.out
    if plan.rerun:
        log(f"--out {out} holds this same run (same settings): its results are replaced")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(plan.outputs[RUN_FILE], {"format": "ssl-transfer-run/1", "config": plan.identity})
    if subset is not None and plan.subset_path != plan.outputs[SUBSET_FILE]:
        save_subset(subset, out / SUBSET_FILE)
    (out / EPOCHS_FILE).write_text("", encoding="utf-8")

    def on_epoch(record: dict[str, Any]) -> None:
        with (out / EPOCHS_FILE).open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    return on_epoch


def _classifier(s: Any, seed: int) -> tuple[torch.nn.Module, Any]:
    """The backbone with a fresh linear classifier; SimCLR v2 exports keep their projection head's first layer(s)."""
    from ssl_cli.artifacts.backbone import ProjectedBackbone

    model = s.model
    if isinstance(model, ProjectedBackbone):  # SimCLR v2: fine-tune from the projection head's first layer(s)
        head = attach_classifier(model.backbone, s.num_classes, model.head, model.num_features, seed=seed)
        return head, s.meta.get("projector")
    return attach_classifier(model, s.num_classes, seed=seed), None


def _hyperparameters(cfg: FinetuneConfig, s: Any, result: Any) -> dict[str, Any]:
    sgd = cfg.optim == "sgd"
    return {
        **cfg.to_dict(),
        "peak_lr": peak_lr(cfg),
        "schedule": "linear warm-up, then cosine to 0, per step",
        "optimizer_settings": {"momentum": 0.9, "nesterov": True} if sgd else {"betas": [0.9, 0.999]},
        "augmentation": "random resized crop + horizontal flip",
        "input_size": s.size,
        "layer_groups": result.num_layers,
        "frozen_parameters": len(result.frozen),
    }


def run_transfer(
    checkpoint: str,
    train: str | None,
    val: str | None,
    out: str | Path,
    cfg: FinetuneConfig,
    *,
    label_fraction: float | None = None,
    label_subset: str | Path | None = None,
    random_init: bool = False,
    device: str = "auto",
    num_workers: int | str = "auto",
    reporter=None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune, evaluate and write the ``--out`` folder (see the module doc); returns the summary ``--json``
    prints. Every bad input raises an ``SSLError`` before anything is written."""
    from ssl_cli.eval.run import setup

    cfg = cfg.resolved()
    plan = _plan(checkpoint, train, val, out, cfg, label_fraction, label_subset, random_init)
    s = setup(checkpoint, train, val, device, random_init)
    subset, labeled = _labeled(plan, s, train, label_fraction, cfg.seed, label_subset)
    _check_enough(labeled, cfg, subset is not None)
    on_epoch = _start_out(plan, subset, log or (lambda _message: None))
    model, projector = _classifier(s, cfg.seed)
    result = finetune(
        model, labeled, s.val, train_eval_transform(s.size, s.mean, s.std), eval_transform(s.size, s.mean, s.std),
        cfg, s.device, num_workers, reporter, on_epoch,
    )  # fmt: skip
    fraction = (
        label_fraction if label_fraction is not None else (plan.saved.fraction if plan.saved is not None else 1.0)
    )
    return _write_results(plan, s, cfg, result, model, projector, labeled, subset, fraction, random_init)


def _write_results(plan, s, cfg, result, model, projector, labeled, subset, fraction, random_init) -> dict[str, Any]:
    """``model.safetensors``, ``metrics.json`` and ``confusion_matrix.png`` in ``--out``; the summary."""
    out, identity, classes = plan.out, plan.identity, s.train.classes
    top1, top5 = topk_accuracy(result.logits, result.labels, (1, 5))
    counts = confusion_matrix(result.logits.argmax(dim=1), result.labels, s.num_classes)
    arch = s.meta["backbone"]["name"]
    metrics = {
        "top1": top1,
        "top5": top5,
        "per_class_accuracy": dict(zip(classes, per_class_accuracy(counts), strict=True)),
        "label_fraction": fraction,
        "num_labeled": len(labeled),
        "num_train_images": len(s.train),
        "num_val_images": len(s.val),
        "label_subset": str(out / SUBSET_FILE) if subset is not None else None,
        "checkpoint": str(plan.checkpoint),
        "architecture": arch,
        "random_init": bool(random_init),
        "train": identity["train"],
        "val": identity["val"],
        "train_loss": result.history[-1]["loss"],
        "epochs": cfg.epochs,
        "steps": result.history[-1]["step"],
        "seconds": result.seconds,
        "hyperparameters": _hyperparameters(cfg, s, result),
        "classes": classes,
        "confusion_matrix": counts.tolist(),
    }
    source = {"checkpoint": str(plan.checkpoint), "method": s.meta.get("method"), "random_init": bool(random_init)}
    extra = {"source": source, "metrics": {"top1": top1, "top5": top5, "val": identity["val"]}}
    meta = finetuned_meta(s.meta, model, classes, projector, extra)
    model.cpu()
    save_finetuned(model, meta, out / MODEL_FILE)
    share = f"{fraction:.0%} of the labels, " if fraction is not None and fraction < 1 else ""
    title = [
        f"ssl transfer: {arch}{' (random init)' if random_init else ''} fine-tuned on {len(labeled)} labeled "
        f"images ({share}{cfg.epochs} epochs)",
        f"{s.val.name}: {len(s.val)} images, top-1 {top1:.4f}, top-5 {top5:.4f}",
        "rows: true class; columns: predicted class; each row normalised to sum 1",
    ]
    save_confusion_png(counts, classes, out / CONFUSION_FILE, title)
    _write_json(out / METRICS_FILE, metrics)
    return {
        "top1": top1,
        "top5": top5,
        "num_labeled": len(labeled),
        "label_fraction": fraction,
        "epochs": cfg.epochs,
        "random_init": bool(random_init),
        "out": str(out),
        "model": str(out / MODEL_FILE),
        "metrics": str(out / METRICS_FILE),
        "confusion_matrix": str(out / CONFUSION_FILE),
        "label_subset": metrics["label_subset"],
    }
