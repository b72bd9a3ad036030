"""Evaluation from a checkpoint alone: backbone + its preprocessing -> features (once) -> kNN / linear probe.

With a :class:`~ssl_cli.eval.cache.FeatureCache` given to :func:`setup`, features come from the on-disk cache when
the same checkpoint, preprocessing and images were seen before (the backbone does not run), and images are only
decoded when features must be extracted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_cli.artifacts.backbone import load_backbone
from ssl_cli.augment import train_eval_transform
from ssl_cli.data import ImageSet, open_dataset
from ssl_cli.errors import DataError, SSLError
from ssl_cli.eval.cache import FeatureCache, images_fingerprint
from ssl_cli.eval.cache import model_id as cache_model_id
from ssl_cli.eval.features import features_of, image_loader
from ssl_cli.eval.knn import bank_dtype_for, knn_classify
from ssl_cli.eval.linear import train_linear_probe
from ssl_cli.eval.metrics import topk_accuracy
from ssl_cli.eval.sweep import holdout_split, sweep_linear_probe, sweep_pairs
from ssl_cli.runtime import resolve_device


@dataclass
class EvalSetup:
    model: nn.Module
    meta: dict[str, Any]
    train: ImageSet
    val: ImageSet
    device: torch.device
    size: int
    mean: list[float]
    std: list[float]
    cache: FeatureCache | None = None
    """Where features are looked up and stored; None: always extract (the images are then decoded in setup)."""
    model_id: dict[str, Any] | None = None
    """What names the weights in the cache key: the checkpoint's SHA-256, ``random_init`` and, when asked for, CMC's
    ``output_view``; CPC v2: the patch-grid readout (``ssl_cli.eval.cache.model_id``)."""
    fingerprints: dict[str, str] = field(default_factory=dict)
    """``train`` / ``val``: the image sets' fingerprints, taken before any decoding."""
    cached: dict[str, bool] = field(default_factory=dict)
    """Per split, whether its features last came from the cache."""

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)


def _labeled(images: ImageSet, flag: str) -> ImageSet:
    if not images.labeled:
        raise DataError(f"{flag} {images.name}: evaluation needs labels (an ImageFolder with class sub-folders)")
    return images


def setup(
    checkpoint: str,
    train: str | None,
    val: str | None,
    device: str,
    random_init: bool = False,
    cache: FeatureCache | None = None,
    output_view: str | None = None,
) -> EvalSetup:
    """Load the backbone and both labeled splits; classes of --val must be those of --train.

    Without ``cache`` the images are decoded here (as ever); with one, only when features must be extracted.
    ``output_view`` (CMC's encoders): ``"all"`` or one colour view's name; None: the checkpoint's own.
    """
    model, meta = load_backbone(checkpoint, with_meta=True, random_init=random_init, output_view=output_view)
    dev = resolve_device(device)
    train_set = _labeled(open_dataset(train, role="train"), "--train")
    val_set = _labeled(open_dataset(val, role="eval"), "--val")
    if train_set.classes != val_set.classes:
        raise DataError(
            f"--val {val_set.name} has classes {val_set.classes[:5]}... but --train {train_set.name} has "
            f"{train_set.classes[:5]}...; both need the same class folders"
        )
    model_id, fingerprints = None, {}
    if cache is None:
        train_set, val_set = train_set.cached("auto"), val_set.cached("auto")
    else:
        model_id = cache_model_id(checkpoint, meta, random_init, output_view)
        fingerprints = {"train": images_fingerprint(train_set), "val": images_fingerprint(val_set)}
    pre = meta["preprocessing"]
    return EvalSetup(
        model.to(dev),
        meta,
        train_set,
        val_set,
        dev,
        int(pre["input_size"][-1]),
        pre["mean"],
        pre["std"],
        cache=cache,
        model_id=model_id,
        fingerprints=fingerprints,
    )


def features(s: EvalSetup, images: ImageSet, batch_size: int, num_workers, progress=None):
    """Features N x D (float32, CPU) and labels of ``images`` (``s.train``, ``s.val`` or another labeled set)."""
    name = "train" if images is s.train else "val" if images is s.val else "images"
    feats, labels, hit = features_of(
        s.model,
        images,
        size=s.size,
        mean=s.mean,
        std=s.std,
        device=s.device,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        cache=s.cache,
        model_id=s.model_id,
        images_id=s.fingerprints.get(name),
        name=name,
    )
    s.cached[name] = hit
    return feats, labels


def run_knn(
    s: EvalSetup,
    k: list[int],
    temperature: float,
    batch_size: int,
    num_workers,
    progress=None,
    dtype: str = "auto",
) -> dict:
    """Weighted kNN of --val against --train; ``dtype`` stores the bank as float32, float16 or ``auto``."""
    train_f, train_y = features(s, s.train, batch_size, num_workers, progress)
    val_f, val_y = features(s, s.val, batch_size, num_workers, progress)
    bank_dtype = bank_dtype_for(train_f.shape, dtype)
    by_k = knn_classify(
        train_f,
        train_y,
        val_f,
        val_y,
        s.num_classes,
        ks=k,
        temperature=temperature,
        bank_dtype=bank_dtype,
        device=s.device,
    )
    best = max(k, key=lambda kk: by_k[kk][0])
    first = k[0]
    return {
        "top1": by_k[first][0],
        "top5": by_k[first][1],
        "k": first,
        "temperature": temperature,
        "by_k": {str(kk): {"top1": t1, "top5": t5} for kk, (t1, t5) in by_k.items()},
        "best_k": best,
        "dtype": str(bank_dtype).removeprefix("torch."),
    }


def _augmented_probe(
    s: EvalSetup,
    val_f,
    val_y,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    num_workers,
    seed: int,
    progress: Callable[[int, float], None] | None,
) -> dict:
    """Linear probe trained on features of augmented images (random resized crop + flip), frozen backbone."""
    torch.manual_seed(seed)
    dim = int(s.model.num_features)
    # BatchNorm without affine in front of the linear layer: feature standardisation that follows the
    # augmented training distribution (MAE's linear-probe recipe)
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, s.num_classes)).to(s.device)
    opt = torch.optim.SGD(head.parameters(), lr=lr * batch_size / 256, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(s.train) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    transform = train_eval_transform(s.size, s.mean, s.std)
    s.model.eval()
    for epoch in range(epochs):
        loader = image_loader(s.train, transform, batch_size, num_workers, shuffle=True, seed=seed + epoch)
        head.train()
        total, n = 0.0, 0
        for x, y in loader:
            with torch.no_grad():
                f = s.model(x.to(s.device)).float()
            loss = F.cross_entropy(head(f), y.to(s.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + loss.item() * len(y), n + len(y)
        if progress:
            progress(epoch + 1, total / max(n, 1))
    head.eval()
    with torch.no_grad():
        logits = head(val_f.to(s.device)).cpu()
    top1, top5 = topk_accuracy(logits, val_y, (1, 5))
    return {"top1": top1, "top5": top5}


def _values(value: float | Sequence[float]) -> list[float]:
    return [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]


def _check_probe_options(
    s: EvalSetup, lrs: list[float], wds: list[float], holdout_fraction: float | None, augment: bool, seed: int
) -> float:
    """One-line errors for bad probe options; returns the holdout fraction to use."""
    if not lrs or not wds:
        raise SSLError("give at least one --lr and one --weight-decay")
    if bad := [v for v in lrs if not v > 0]:
        raise SSLError(f"--lr {bad[0]:g}: must be > 0")
    if bad := [v for v in wds if not v >= 0]:
        raise SSLError(f"--weight-decay {bad[0]:g}: must be >= 0")
    pairs = len(sweep_pairs(lrs, wds))
    if augment:
        if pairs > 1 or holdout_fraction:
            raise SSLError(
                "--augment trains one classifier on augmented images: give one --lr and one --weight-decay and no "
                "--holdout-fraction (the sweep runs on cached features, without --augment)"
            )
        return 0.0
    if holdout_fraction is None:
        holdout_fraction = 0.1 if pairs > 1 else 0.0
    if not 0 <= holdout_fraction < 1:
        raise SSLError(f"--holdout-fraction {holdout_fraction:g}: must be in [0, 1) (0.1 holds out a tenth of --train)")
    if pairs > 1 and holdout_fraction == 0:
        raise SSLError(
            f"--holdout-fraction 0 with {pairs} (lr, weight decay) pairs: the pair is chosen on held-out train data, "
            "so the fraction must be > 0 (default 0.1)"
        )
    if holdout_fraction > 0 and holdout_split(s.train.labels, holdout_fraction, seed)[1].numel() == 0:
        raise SSLError(
            f"--holdout-fraction {holdout_fraction:g} holds out no image of --train {s.train.name} "
            f"({len(s.train)} images, {s.num_classes} classes); raise it"
        )
    return holdout_fraction


def run_probe(
    s: EvalSetup,
    epochs: int,
    lr: float | Sequence[float],
    weight_decay: float | Sequence[float],
    batch_size: int,
    augment: bool,
    num_workers,
    seed: int = 0,
    progress=None,
    feature_progress=None,
    holdout_fraction: float | None = None,
) -> dict:
    """Linear probe; several ``lr`` / ``weight_decay`` values sweep every pair in one pass (see ``eval.sweep``).

    One pair without a holdout is the plain probe (:func:`~ssl_cli.eval.linear.train_linear_probe`). Several
    pairs train together on all but ``holdout_fraction`` (default 0.1) of --train; the pair with the best
    held-out top-1 is reported with its top-1 / top-5 on --val, and every pair's held-out figures under ``sweep``.
    """
    lrs, wds = _values(lr), _values(weight_decay)
    holdout_fraction = _check_probe_options(s, lrs, wds, holdout_fraction, augment, seed)
    val_f, val_y = features(s, s.val, batch_size, num_workers, feature_progress)
    if augment:
        s.train = s.train.cached("auto")  # many epochs over the images: decode them once
        result = _augmented_probe(s, val_f, val_y, epochs, lrs[0], wds[0], batch_size, num_workers, seed, progress)
        return {**result, "epochs": epochs, "lr": lrs[0], "weight_decay": wds[0], "augment": augment}
    train_f, train_y = features(s, s.train, batch_size, num_workers, feature_progress)
    if len(sweep_pairs(lrs, wds)) == 1 and holdout_fraction == 0:
        r = train_linear_probe(
            train_f,
            train_y,
            val_f,
            val_y,
            s.num_classes,
            epochs=epochs,
            lr=lrs[0],
            weight_decay=wds[0],
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
        result = {"top1": r.top1, "top5": r.top5, "train_top1": r.train_top1}
        return {**result, "epochs": epochs, "lr": lrs[0], "weight_decay": wds[0], "augment": augment}
    dev = s.device
    r = sweep_linear_probe(
        train_f.to(dev),
        train_y.to(dev),
        val_f.to(dev),
        val_y.to(dev),
        s.num_classes,
        lrs=lrs,
        weight_decays=wds,
        holdout_fraction=holdout_fraction,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    return {
        "top1": r.top1,
        "top5": r.top5,
        "train_top1": r.train_top1,
        "epochs": epochs,
        "lr": r.lr,
        "weight_decay": r.weight_decay,
        "augment": False,
        "selected_on": "holdout",
        "holdout_fraction": r.holdout_fraction,
        "train_size": r.train_size,
        "holdout_size": r.holdout_size,
        "sweep": [
            {
                "lr": h.lr,
                "weight_decay": h.weight_decay,
                "holdout_top1": h.holdout_top1,
                "holdout_top5": h.holdout_top5,
                "holdout_loss": h.holdout_loss,
                "train_top1": h.train_top1,
                "selected": i == r.best,
            }
            for i, h in enumerate(r.heads)
        ],
    }
