"""Evaluation from a checkpoint alone: backbone + its preprocessing -> features (once) -> kNN / linear probe."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_cli.augment import eval_transform, train_eval_transform
from ssl_cli.data import ImageSet, open_dataset
from ssl_cli.errors import DataError
from ssl_cli.eval.features import extract_features, image_loader
from ssl_cli.eval.knn import knn_classify
from ssl_cli.eval.linear import train_linear_probe
from ssl_cli.eval.metrics import topk_accuracy
from ssl_cli.export import load_backbone
from ssl_cli.train.pretrain import resolve_device


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

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)


def _labeled(images: ImageSet, flag: str) -> ImageSet:
    if not images.labeled:
        raise DataError(f"{flag} {images.name}: evaluation needs labels (an ImageFolder with class sub-folders)")
    return images


def setup(checkpoint: str, train: str | None, val: str | None, device: str, random_init: bool = False) -> EvalSetup:
    """Load the backbone and both labeled splits; classes of --val must be those of --train."""
    model, meta = load_backbone(checkpoint, with_meta=True)
    if random_init:
        # same architecture, fresh random weights: the baseline every SSL method must beat
        torch.manual_seed(0)
        from ssl_cli.backbones import build_backbone
        from ssl_cli.export import backbone_config

        model = build_backbone(backbone_config(meta)).eval()
    dev = resolve_device(device)
    train_set = _labeled(open_dataset(train, role="train"), "--train").cached("auto")
    val_set = _labeled(open_dataset(val, role="eval"), "--val").cached("auto")
    if train_set.classes != val_set.classes:
        raise DataError(
            f"--val {val_set.name} has classes {val_set.classes[:5]}... but --train {train_set.name} has "
            f"{train_set.classes[:5]}...; both need the same class folders"
        )
    pre = meta["preprocessing"]
    return EvalSetup(model.to(dev), meta, train_set, val_set, dev, int(pre["input_size"][-1]), pre["mean"], pre["std"])


def features(s: EvalSetup, images: ImageSet, batch_size: int, num_workers, progress=None):
    loader = image_loader(images, eval_transform(s.size, s.mean, s.std), batch_size, num_workers)
    return extract_features(s.model, loader, s.device, progress)


def run_knn(s: EvalSetup, ks: list[int], temperature: float, batch_size: int, num_workers, progress=None) -> dict:
    train_f, train_y = features(s, s.train, batch_size, num_workers, progress)
    val_f, val_y = features(s, s.val, batch_size, num_workers, progress)
    by_k = knn_classify(train_f, train_y, val_f, val_y, s.num_classes, ks=ks, temperature=temperature)
    best = max(ks, key=lambda k: by_k[k][0])
    first = ks[0]
    return {
        "top1": by_k[first][0],
        "top5": by_k[first][1],
        "k": first,
        "temperature": temperature,
        "by_k": {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in by_k.items()},
        "best_k": best,
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
            total, n = total + float(loss) * len(y), n + len(y)
        if progress:
            progress(epoch + 1, total / max(n, 1))
    head.eval()
    with torch.no_grad():
        logits = head(val_f.to(s.device)).cpu()
    top1, top5 = topk_accuracy(logits, val_y, (1, 5))
    return {"top1": top1, "top5": top5}


def run_probe(
    s: EvalSetup,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    augment: bool,
    num_workers,
    seed: int = 0,
    progress=None,
    feature_progress=None,
) -> dict:
    val_f, val_y = features(s, s.val, batch_size, num_workers, feature_progress)
    if augment:
        result = _augmented_probe(s, val_f, val_y, epochs, lr, weight_decay, batch_size, num_workers, seed, progress)
    else:
        train_f, train_y = features(s, s.train, batch_size, num_workers, feature_progress)
        r = train_linear_probe(
            train_f,
            train_y,
            val_f,
            val_y,
            s.num_classes,
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
        result = {"top1": r.top1, "top5": r.top5, "train_top1": r.train_top1}
    return {**result, "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "augment": augment}
