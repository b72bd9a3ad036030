"""Weighted k-nearest-neighbour classification of frozen features.

The protocol of InstDisc (Wu et al. 2018, arXiv:1805.01978) as used by DINO's ``eval_knn``: features
are L2-normalised, neighbours are ranked by cosine similarity and each of the ``k`` nearest train
samples votes for its label with weight ``exp(similarity / temperature)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_cli.eval.metrics import check_splits, float_dtype, topk_correct


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    ks: Sequence[int] = (200,),
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[int, tuple[float, float]]:
    """Weighted kNN top-1/top-5 accuracy of ``test_features`` against ``train_features``.

    The test set is processed ``chunk_size`` rows at a time, so only a ``(chunk_size, N_train)``
    block of the similarity matrix exists at once. The ``max(ks)`` nearest neighbours are found once
    per chunk and every ``k`` is evaluated on a prefix of that sorted list. ``k`` larger than the
    train set is clamped to ``N_train``. Classes with equal summed votes are ranked by lower class
    index, so results are deterministic.

    Args:
        train_features: ``(N_train, D)`` features of the labelled reference set.
        train_labels: ``(N_train,)`` integer labels in ``[0, num_classes)``.
        test_features: ``(N_test, D)`` features to classify.
        test_labels: ``(N_test,)`` integer labels in ``[0, num_classes)``.
        num_classes: number of classes.
        ks: neighbour counts to evaluate, each >= 1.
        temperature: softness of the vote weights ``exp(sim / temperature)``; must be > 0.
        chunk_size: number of test samples per similarity block; must be >= 1.

    Returns:
        ``{k: (top1, top5)}`` for every ``k`` in ``ks`` (as given, before clamping), as fractions in
        ``[0, 1]``. With fewer than 5 classes, top-5 counts all classes and is therefore 1.0.

    Raises:
        ValueError: on mismatched shapes, an empty train or test set, ``k < 1``, labels outside
            ``[0, num_classes)``, or a non-positive ``temperature`` / ``chunk_size``.
    """
    check_splits(train_features, train_labels, test_features, test_labels, num_classes)
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must contain at least one k")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {ks}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    device, dtype = train_features.device, float_dtype(train_features, test_features)
    # Unit-norm rows turn the matrix product into cosine similarity.
    train = F.normalize(train_features.to(dtype), dim=1)
    train_labels = train_labels.to(device=device, dtype=torch.long)
    num_train, num_test = train.shape[0], test_features.shape[0]
    clamped = {k: min(k, num_train) for k in ks}
    max_k = max(clamped.values())

    correct = {k: [0, 0] for k in ks}
    for start in range(0, num_test, chunk_size):
        test = F.normalize(test_features[start : start + chunk_size].to(device, dtype), dim=1)
        labels = test_labels[start : start + chunk_size].to(device=device, dtype=torch.long)
        similarity = test @ train.T  # (chunk, N_train)
        # topk returns neighbours sorted by similarity, so the k nearest are always a prefix.
        top_sim, top_index = similarity.topk(max_k, dim=1)  # (chunk, max_k)
        # Subtracting each row's best similarity multiplies that row's votes by one positive
        # constant: the class ranking is unchanged but exp() cannot overflow for small temperatures.
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()
        neighbour_labels = train_labels[top_index]  # (chunk, max_k)
        for k in ks:
            kk = clamped[k]
            votes = torch.zeros(labels.shape[0], num_classes, dtype=weights.dtype, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            top1, top5 = topk_correct(votes, labels, (1, 5))
            correct[k][0] += top1
            correct[k][1] += top5
    return {k: (top1 / num_test, top5 / num_test) for k, (top1, top5) in correct.items()}
