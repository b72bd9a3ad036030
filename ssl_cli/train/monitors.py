"""Online monitors during pretraining: kNN on held-out images and a detached linear classifier.

``ssl pretrain --val DIR`` (labeled held-out images; the training images must be labeled too) turns them on:

* **online linear classifier** (solo-learn's online evaluation [0]): a linear layer on the backbone's features of
  every training batch, trained with cross-entropy from the batch's labels. Its input is detached, so the
  backbone's gradients are exactly the method's own; it has its own optimizer group (no weight decay, no LARS
  adaptation, ``monitor.online_lr`` at the schedule's peak, following the run's schedule). The step's training
  accuracy is logged as ``online_top1``; at evaluation epochs its accuracy on the held-out images as
  ``online_val_top1`` / ``online_val_top5``.
* **kNN** every ``monitor.knn.every`` epochs (and at the last): weighted kNN [1] (cosine, votes
  ``exp(sim / T)``, ``monitor.knn.k`` neighbours) of the held-out images' features against the training images'
  features, both from the backbone in eval mode on un-augmented images, read as ``ssl knn`` reads them from the
  run's checkpoints (``Method.feature_model``: the backbone's output; CPC v2: the mean of its patch grid's features);
  logged as ``knn_top1`` / ``knn_top5``. The online classifier's held-out figures are on those features too.

[0] solo-learn, da Costa et al. 2022, JMLR 23(56) (``BaseMethod``'s online classifier).
[1] Wu et al. 2018, arXiv:1805.01978 (InstDisc), as in DINO's ``eval_knn``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ssl_cli.augment import eval_transform
from ssl_cli.config.schema import Recipe
from ssl_cli.data import ImageSet, open_dataset
from ssl_cli.data.loader import resolve_workers
from ssl_cli.errors import CheckpointError, DataError
from ssl_cli.eval.features import extract_features, image_loader
from ssl_cli.eval.knn import knn_classify
from ssl_cli.eval.metrics import topk_accuracy
from ssl_cli.methods import Method

CLASSIFIER_PREFIX = "online_classifier."
EVAL_BATCH_SIZE = 256


class OnlineMonitors:
    """The monitors of one run: the held-out set, the settings, and the evaluation at epoch ends."""

    def __init__(self, recipe: Recipe, train: ImageSet, val: ImageSet) -> None:
        self.recipe = recipe
        self.train = train
        self.val = val
        self.config = recipe.monitor
        self.online_lr = recipe.monitor.resolved_online_lr(recipe.optim.name)

    @classmethod
    def open(cls, recipe: Recipe, train: ImageSet, val_spec: str) -> OnlineMonitors:
        """Open ``--val`` and check both sets can be scored: labels, and the same classes."""
        if not train.labeled:
            raise DataError(
                f"--val: the monitors need labels for the training images too, but {train.name} has none "
                "(an ImageFolder with class sub-folders); drop --val to pretrain on unlabeled images"
            )
        val = open_dataset(val_spec, role="eval")
        if not val.labeled:
            raise DataError(f"--val {val.name}: the monitors need labels (an ImageFolder with class sub-folders)")
        if val.classes != train.classes:
            raise DataError(
                f"--val {val.name} has classes {val.classes[:5]}... but the training data {train.name} has "
                f"{train.classes[:5]}...; both need the same class folders"
            )
        return cls(recipe, train, val.cached("auto"))

    @property
    def online_linear(self) -> bool:
        return self.config.online_linear

    def attach(self, method: Method) -> None:
        """Give ``method`` its online classifier (weights from the run's seed, the global RNG untouched)."""
        if self.online_linear:
            generator = torch.Generator().manual_seed(self.recipe.train.seed)
            method.attach_online_classifier(self.train.labels.clone(), len(self.train.classes), generator)

    def param_groups(self, groups: list[dict], method: Method, base_lr: float) -> list[dict]:
        """``groups`` plus the classifier's own: its rate is ``online_lr`` x the schedule's factor."""
        if method.online_classifier is None:
            return groups
        params = list(method.online_classifier.named_parameters(prefix="online_classifier"))
        return [
            *groups,
            {
                "params": [p for _, p in params],
                "names": [n for n, _ in params],
                "weight_decay": 0.0,
                "lars_adapt": False,
                "lr_scale": self.online_lr / base_lr,
            },
        ]

    def due(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (counting from 1) ends with an evaluation."""
        every = self.config.knn.every
        return every > 0 and (epoch % every == 0 or epoch == self.recipe.train.epochs)

    @torch.no_grad()
    def evaluate(self, method: Method, device: torch.device) -> dict[str, float]:
        """kNN and the online classifier on the held-out images, with the backbone in eval mode."""
        size = max(v.size for v in self.recipe.views)
        transform = eval_transform(size, self.recipe.data.mean, self.recipe.data.std)
        workers = resolve_workers(self.recipe.data.num_workers)
        was_training = method.training
        model = method.feature_model()  # what ``ssl knn`` reads from the run's checkpoints
        try:
            train_f, train_y = extract_features(
                model, image_loader(self.train, transform, EVAL_BATCH_SIZE, workers), device
            )
            val_f, val_y = extract_features(model, image_loader(self.val, transform, EVAL_BATCH_SIZE, workers), device)
        finally:
            method.train(was_training)
        k, temperature = self.config.knn.k, self.config.knn.temperature
        by_k = knn_classify(train_f, train_y, val_f, val_y, len(self.train.classes), ks=(k,), temperature=temperature)
        record = {"knn_top1": by_k[k][0], "knn_top5": by_k[k][1]}
        if method.online_classifier is not None:
            logits = method.online_classifier(val_f.to(device)).float().cpu()
            record["online_val_top1"], record["online_val_top5"] = topk_accuracy(logits, val_y, (1, 5))
        return record

    def describe(self) -> dict[str, Any]:
        settings = {**self.config.model_dump(mode="json"), "online_lr": self.online_lr}
        return {"val": self.val.name, "num_val_images": len(self.val), **settings}


def check_resume_monitors(model_keys: Iterable[str], monitors: OnlineMonitors | None, path: object) -> None:
    """A run keeps its monitors: the classifier's weights and optimizer state are in the checkpoint or not."""
    had = any(k.startswith(CLASSIFIER_PREFIX) for k in model_keys)
    has = monitors is not None and monitors.online_linear
    if had and not has:
        raise CheckpointError(
            f"--resume: {path} was trained with the online classifier (--val); resume with the same --val"
        )
    if has and not had:
        raise CheckpointError(f"--resume: {path} was trained without the online classifier; resume without --val")
