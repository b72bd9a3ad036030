"""Linear-probe sweep: several (learning rate, weight decay) pairs trained in one pass, chosen on held-out train data.

The linear-evaluation protocol of DINO (Caron et al. 2021, arXiv:2104.14294, ``eval_linear.py``), solo-learn
and VISSL trains one linear classifier per learning rate on the same frozen features in one run. Here every
``(lr, weight_decay)`` pair gets its own head, all heads see the same shuffled mini-batches in one pass
(:func:`~ssl_cli.eval.linear.fit_linear_heads`), and the pair is chosen on a class-balanced, seeded
held-out part of the train set -- not on the test split, whose figure is then reported for that pair alone.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_cli.eval.linear import fit_linear_heads, standardization
from ssl_cli.eval.metrics import check_split, check_splits, float_dtype, topk_accuracy

DEFAULT_HOLDOUT_FRACTION = 0.1
"""The held-out share of train when several pairs are swept and no fraction is given."""


@dataclass
class HeadResult:
    """One swept pair: its hyper-parameters and how its head did on the held-out part and on what it trained on."""

    lr: float
    weight_decay: float
    holdout_top1: float | None
    holdout_top5: float | None
    holdout_loss: float | None
    train_top1: float


@dataclass
class SweepResult:
    """Outcome of :func:`sweep_linear_probe`.

    Attributes:
        top1, top5: the chosen head's accuracy on the test features.
        train_top1: the chosen head's accuracy on the features it trained on.
        lr, weight_decay: the chosen pair.
        best: index of the chosen pair in ``heads``.
        heads: every pair, in sweep order (learning rates outer, weight decays inner).
        epochs: epochs trained.
        holdout_fraction: the share of train held out (0: none; the only pair is the answer).
        train_size, holdout_size: samples trained on / held out.
        weights, biases: ``(P, C, D)`` and ``(P, C)``, the trained heads (on standardised features when
            ``mean`` / ``std`` are set: logits are ``((x - mean) / std) @ weights[p].T + biases[p]``).
    """

    top1: float
    top5: float
    train_top1: float
    lr: float
    weight_decay: float
    best: int
    heads: list[HeadResult]
    epochs: int
    holdout_fraction: float
    train_size: int
    holdout_size: int
    weights: Tensor = field(repr=False)
    biases: Tensor = field(repr=False)
    mean: Tensor | None = field(default=None, repr=False)
    std: Tensor | None = field(default=None, repr=False)


def holdout_split(labels: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Class-balanced, seeded split of ``range(len(labels))`` into (train indices, held-out indices).

    Every class gives ``round(fraction * n_c)`` of its ``n_c`` samples (half rounds up), drawn by a
    permutation of that class's indices from a generator seeded with ``seed``, but always keeps at least one
    sample for training. Both index lists are sorted; the same labels, fraction and seed give the same split.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    labels = labels.detach().cpu().to(torch.int64)
    generator = torch.Generator().manual_seed(seed)
    held: list[Tensor] = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().squeeze(1)
        count = min(math.floor(fraction * members.numel() + 0.5), members.numel() - 1)
        held.append(members[torch.randperm(members.numel(), generator=generator)[:count]])
    holdout = torch.cat(held).sort().values if held else torch.empty(0, dtype=torch.int64)
    keep = torch.ones(labels.numel(), dtype=torch.bool)
    keep[holdout] = False
    return keep.nonzero().squeeze(1), holdout


def sweep_pairs(lrs: Sequence[float], weight_decays: Sequence[float]) -> list[tuple[float, float]]:
    """Every (lr, weight decay) combination, learning rates outer; repeated values are swept once."""
    return list(itertools.product(dict.fromkeys(lrs), dict.fromkeys(weight_decays)))


def _checked_holdout(
    pairs: list[tuple[float, float]], lrs: Sequence[float], weight_decays: Sequence[float], epochs: int,
    batch_size: int, momentum: float, holdout_fraction: float | None,
) -> float:  # fmt: skip
    """Check the sweep's settings; the holdout fraction to use (default 0.1 with several pairs, 0 with one)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if any(lr <= 0 for lr, _ in pairs):
        raise ValueError(f"every lr must be > 0, got {list(dict.fromkeys(lrs))}")
    if any(wd < 0 for _, wd in pairs):
        raise ValueError(f"every weight_decay must be >= 0, got {list(dict.fromkeys(weight_decays))}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if holdout_fraction is None:
        holdout_fraction = DEFAULT_HOLDOUT_FRACTION if len(pairs) > 1 else 0.0
    if not 0 <= holdout_fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {holdout_fraction}")
    if len(pairs) > 1 and holdout_fraction == 0:
        raise ValueError(
            f"{len(pairs)} (lr, weight decay) pairs need a holdout fraction > 0 to choose on "
            "(choosing on the test split would overstate its accuracy)"
        )
    return holdout_fraction


def _score_heads(
    heads: list, pairs: list[tuple[float, float]], train_x: Tensor, train_y: Tensor, held_x: Tensor, held_y: Tensor
) -> tuple[list[HeadResult], int]:
    """Every head's train and held-out scores, and the index of the best: highest held-out top-1, then lowest
    held-out cross-entropy, then sweep order (the first pair without a holdout)."""
    results: list[HeadResult] = []
    with torch.no_grad():
        for head, (lr, wd) in zip(heads, pairs, strict=True):
            (train_top1,) = topk_accuracy(head(train_x), train_y, (1,))
            h1 = h5 = h_loss = None
            if held_y.numel():
                logits = head(held_x)
                h1, h5 = topk_accuracy(logits, held_y, (1, 5))
                h_loss = float(F.cross_entropy(logits, held_y))
            results.append(HeadResult(lr, wd, h1, h5, h_loss, train_top1))
    if held_y.numel():

        def rank(i: int) -> tuple[float, float, int]:
            loss = results[i].holdout_loss
            return -results[i].holdout_top1, loss if math.isfinite(loss) else math.inf, i

        best = min(range(len(pairs)), key=rank)
    else:
        best = 0
    return results, best


def sweep_linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    *,
    lrs: Sequence[float] = (0.1,),
    weight_decays: Sequence[float] = (0.0,),
    holdout_fraction: float | None = None,
    epochs: int = 100,
    batch_size: int = 256,
    momentum: float = 0.9,
    seed: int = 0,
    normalize: bool = True,
    progress: Callable[[int, list[float]], None] | None = None,
) -> SweepResult:
    """Train one linear head per (lr, weight decay) pair in one pass and report the pair best on held-out train.

    The train features are split (:func:`holdout_split`, ``holdout_fraction``; default 0.1 with several pairs,
    0 with one). The heads train on the rest exactly as :func:`~ssl_cli.eval.linear.train_linear_probe` trains
    its one head (same init, batches, schedule; standardised with the statistics of the part trained on). The
    chosen pair has the best held-out top-1 (ties: lower held-out cross-entropy, then sweep order). Only the
    chosen head is scored on the test features. With one pair and no holdout this is ``train_linear_probe``.

    Raises:
        ValueError: on invalid splits or hyper-parameters, several pairs without a holdout, or a holdout that
            ends up empty.
    """
    check_splits(train_features, train_labels, test_features, test_labels, num_classes)
    pairs = sweep_pairs(lrs, weight_decays)
    if not pairs:
        raise ValueError("give at least one learning rate and one weight decay")
    holdout_fraction = _checked_holdout(pairs, lrs, weight_decays, epochs, batch_size, momentum, holdout_fraction)

    device, dtype = train_features.device, float_dtype(train_features, test_features)
    x_all = train_features.detach().to(device, dtype)
    y_all = train_labels.to(device=device, dtype=torch.long)
    test_x = test_features.detach().to(device, dtype)
    test_y = test_labels.to(device=device, dtype=torch.long)
    fit_idx, held_idx = holdout_split(train_labels, holdout_fraction, seed)
    if holdout_fraction > 0 and held_idx.numel() == 0:
        raise ValueError(
            f"holdout fraction {holdout_fraction} of {len(train_labels)} train samples holds out none; "
            "raise it or give more train data"
        )
    train_x, train_y = x_all[fit_idx.to(device)], y_all[fit_idx.to(device)]
    held_x, held_y = x_all[held_idx.to(device)], y_all[held_idx.to(device)]
    check_split(train_x, train_y, num_classes, "train (after the holdout)")

    mean = std = None
    if normalize:
        # Statistics of the part trained on only: the held-out part plays the test set's role.
        mean, std = standardization(train_x)
        train_x, held_x, test_x = (train_x - mean) / std, (held_x - mean) / std, (test_x - mean) / std

    generator = torch.Generator(device="cpu").manual_seed(seed)
    heads = fit_linear_heads(
        train_x,
        train_y,
        num_classes,
        pairs,
        epochs=epochs,
        batch_size=batch_size,
        momentum=momentum,
        generator=generator,
        progress=progress,
    )

    results, best = _score_heads(heads, pairs, train_x, train_y, held_x, held_y)
    with torch.no_grad():
        top1, top5 = topk_accuracy(heads[best](test_x), test_y, (1, 5))
    return SweepResult(
        top1=top1,
        top5=top5,
        train_top1=results[best].train_top1,
        lr=pairs[best][0],
        weight_decay=pairs[best][1],
        best=best,
        heads=results,
        epochs=epochs,
        holdout_fraction=holdout_fraction,
        train_size=int(fit_idx.numel()),
        holdout_size=int(held_idx.numel()),
        weights=torch.stack([h.weight.detach() for h in heads]),
        biases=torch.stack([h.bias.detach() for h in heads]),
        mean=mean,
        std=std,
    )
