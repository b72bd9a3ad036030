"""Accuracy helpers and input checks shared by the kNN and linear-probe evaluations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def topk_correct(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> tuple[int, ...]:
    """Count the samples whose true label is among the ``k`` highest-scoring classes.

    Ties are broken in favour of the lower class index (what a stable descending sort would do), so
    the counts are deterministic even when several classes share a score, e.g. kNN classes that got
    no votes at all. ``k`` is clamped to the number of classes. A row holding a NaN score is never correct.

    Args:
        scores: ``(N, C)`` class scores (logits, probabilities or summed votes); higher is better.
        labels: ``(N,)`` integer true labels in ``[0, C)``.
        ks: the ``k`` values to count for, each >= 1.

    Returns:
        One count per entry of ``ks``, each in ``[0, N]``.
    """
    if scores.ndim != 2 or labels.ndim != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"expected scores (N, C) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {tuple(ks)}")
    labels = labels.to(device=scores.device, dtype=torch.long)
    true_score = scores.gather(1, labels[:, None])  # (N, 1)
    # The rank of the true class: classes scoring strictly higher, plus equal-scoring classes with a
    # lower index. Computing the rank directly avoids sorting and makes the tie-break explicit.
    class_index = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > true_score) | ((scores == true_score) & (class_index < labels[:, None]))
    rank = ahead.sum(dim=1)  # (N,), 0 = predicted class
    # NaN compares false with everything, which would rank the true class first: a row with a NaN score (a
    # diverged classifier) counts as wrong at every k.
    rank = rank.masked_fill(scores.isnan().any(dim=1), torch.iinfo(rank.dtype).max)
    return tuple(int((rank < k).sum()) for k in ks)


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> tuple[float, ...]:
    """Top-k accuracy as fractions in ``[0, 1]``.

    ``k`` is clamped to the number of classes, so top-5 with 3 classes is 1.0. Ties are broken in
    favour of the lower class index (see :func:`topk_correct`).

    Args:
        logits: ``(N, C)`` class scores, higher is better; N must be >= 1.
        labels: ``(N,)`` integer true labels in ``[0, C)``.
        ks: the ``k`` values to report, each >= 1.

    Returns:
        One accuracy per entry of ``ks``.
    """
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"expected non-empty logits of shape (N, C), got {tuple(logits.shape)}")
    counts = topk_correct(logits, labels, ks)
    return tuple(count / logits.shape[0] for count in counts)


def check_split(features: Tensor, labels: Tensor, num_classes: int, name: str) -> None:
    """Raise ``ValueError`` unless ``features``/``labels`` form a valid, non-empty labelled split.

    Args:
        features: ``(N, D)`` feature matrix.
        labels: ``(N,)`` integer labels, each in ``[0, num_classes)``.
        num_classes: number of classes.
        name: split name used in error messages, e.g. ``"train"``.
    """
    if features.ndim != 2:
        raise ValueError(f"{name} features must be 2-D (N, D), got shape {tuple(features.shape)}")
    if labels.ndim != 1:
        raise ValueError(f"{name} labels must be 1-D (N,), got shape {tuple(labels.shape)}")
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{name} features and labels have different lengths: {features.shape[0]} vs {labels.shape[0]}")
    if features.shape[0] == 0:
        raise ValueError(f"{name} set is empty")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name} labels must be integers, got dtype {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name} labels must lie in [0, {num_classes}), found values in [{low}, {high}]")


def float_dtype(*tensors: Tensor) -> torch.dtype:
    """The floating dtype to compute in: the promotion of the inputs' dtypes, at least float32.

    Half-precision features (as saved by AMP runs) are upcast so that similarities, sums of votes and
    gradients are not computed in 16 bits; float64 inputs keep float64.
    """
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def check_splits(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor, num_classes: int
) -> None:
    """Validate a train / test pair of feature splits for the same classifier (raises ``ValueError``)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    check_split(train_features, train_labels, num_classes, "train")
    check_split(test_features, test_labels, num_classes, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train and test features have different dimensions: {train_features.shape[1]} vs {test_features.shape[1]}"
        )
