"""Weighted k-nearest-neighbour classification of frozen features.

The protocol of InstDisc (Wu et al. 2018, arXiv:1805.01978) as used by DINO's ``eval_knn``: features
are L2-normalised, neighbours are ranked by cosine similarity and each of the ``k`` nearest train
samples votes for its label with weight ``exp(similarity / temperature)``.

The search is blocked over both the test set and the train bank (a running top-k is merged across bank
chunks), so its memory is bounded for banks of millions of images; the bank may be stored in float16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_cli.eval.metrics import check_splits, float_dtype, topk_correct

AUTO_FLOAT16_BYTES = 2**30
"""``dtype="auto"`` stores the bank as float16 when its float32 copy would take more than this (1 GiB: e.g.
524,288 features of 512 dimensions); smaller banks stay float32, so their figures are unchanged."""

BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def bank_dtype_for(shape: Sequence[int], choice: str = "auto") -> torch.dtype:
    """The bank's storage type for ``--dtype``: ``float32``, ``float16`` or ``auto`` (float16 above 1 GiB)."""
    if choice == "auto":
        num, dim = shape
        return torch.float16 if num * dim * 4 > AUTO_FLOAT16_BYTES else torch.float32
    if choice not in BANK_DTYPES:
        raise ValueError(f"bank dtype must be auto, {', '.join(BANK_DTYPES)}; got {choice!r}")
    return BANK_DTYPES[choice]


def _ordered(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of (value, index) pairs sorted by value descending, equal values by index ascending."""
    indices, by_index = indices.sort(dim=1)
    values = values.gather(1, by_index)
    values, by_value = values.sort(dim=1, descending=True, stable=True)
    return values, indices.gather(1, by_value)


def _block_topk(similarity: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of every row and their columns, ties resolved towards the lower column.

    ``topk`` alone may pick any of several entries equal to the k-th largest value. One more entry is taken to
    see where that choice existed (the (k+1)-th largest equals the k-th); those rows are redone with a stable
    sort of the whole row.
    """
    k = min(k, similarity.shape[1])
    values, indices = similarity.topk(min(k + 1, similarity.shape[1]), dim=1)
    if values.shape[1] > k:
        ambiguous = (values[:, k] == values[:, k - 1]).nonzero().squeeze(1)
        values, indices = values[:, :k], indices[:, :k]
        if ambiguous.numel():
            row_values, row_indices = similarity[ambiguous].sort(dim=1, descending=True, stable=True)
            values[ambiguous], indices[ambiguous] = row_values[:, :k], row_indices[:, :k]
    return _ordered(values, indices)


def normalized_bank(
    features: Tensor,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    chunk_size: int = 65536,
) -> Tensor:
    """Unit-norm rows of ``features`` stored as ``dtype`` on ``device``, normalised ``chunk_size`` rows at a time.

    Only one chunk exists at the compute precision at once, so a float16 bank of a float32 input costs half the
    input's size in extra memory, not twice it.
    """
    dtype = dtype or float_dtype(features)
    device = torch.device(device) if device is not None else features.device
    compute = float_dtype(features)
    bank = torch.empty(features.shape, dtype=dtype, device=device)
    for start in range(0, features.shape[0], chunk_size):
        chunk = features[start : start + chunk_size].to(device, compute)
        bank[start : start + chunk_size] = F.normalize(chunk, dim=1)
    return bank


def nearest_neighbors(
    queries: Tensor, bank: Tensor, k: int, train_chunk_size: int = 65536, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Similarities and indices of the ``k`` bank rows with the largest ``queries @ bank.T``, per query.

    The bank is visited ``train_chunk_size`` rows at a time and the running top-k is merged with each chunk's,
    so at most ``(len(queries), train_chunk_size)`` similarities exist at once. The order is by similarity,
    descending, and equal similarities by bank index, ascending: the same list for every chunk size. Chunks
    of a float16 / bfloat16 bank are computed at ``dtype`` (default: the queries' precision, at least float32).
    """
    if train_chunk_size < 1:
        raise ValueError(f"train_chunk_size must be >= 1, got {train_chunk_size}")
    dtype = dtype or float_dtype(queries)
    queries = queries.to(dtype)
    k = min(k, bank.shape[0])
    best_values = best_indices = None
    for start in range(0, bank.shape[0], train_chunk_size):
        similarity = queries @ bank[start : start + train_chunk_size].to(dtype).T
        values, indices = _block_topk(similarity, k)
        indices += start
        if best_values is None:
            best_values, best_indices = values, indices
            continue
        # Both lists are ordered by (value desc, index asc) and every running index is below this chunk's,
        # so a stable sort by value of their concatenation keeps that order.
        values = torch.cat([best_values, values], dim=1)
        indices = torch.cat([best_indices, indices], dim=1)
        values, order = values.sort(dim=1, descending=True, stable=True)
        best_values, best_indices = values[:, :k], indices.gather(1, order[:, :k])
    return best_values, best_indices


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
    train_chunk_size: int = 65536,
    bank_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> dict[int, tuple[float, float]]:
    """Weighted kNN top-1/top-5 accuracy of ``test_features`` against ``train_features``.

    Memory is bounded for any bank size: the test set is processed ``chunk_size`` rows at a time and the
    train bank ``train_chunk_size`` rows at a time, merging the running top-k across bank chunks, so at most
    a ``(chunk_size, train_chunk_size)`` block of similarities exists at once. The ``max(ks)`` nearest
    neighbours are found once per test chunk and every ``k`` is evaluated on a prefix of that sorted list.
    Neighbours with equal similarity are ranked by lower train index and classes with equal summed votes by
    lower class index, so results are deterministic and the same for every chunk size. ``k`` larger than the
    train set is clamped to ``N_train``.

    Args:
        train_features: ``(N_train, D)`` features of the labelled reference set.
        train_labels: ``(N_train,)`` integer labels in ``[0, num_classes)``.
        test_features: ``(N_test, D)`` features to classify.
        test_labels: ``(N_test,)`` integer labels in ``[0, num_classes)``.
        num_classes: number of classes.
        ks: neighbour counts to evaluate, each >= 1.
        temperature: softness of the vote weights ``exp(sim / temperature)``; must be > 0.
        chunk_size: number of test samples per similarity block; must be >= 1.
        train_chunk_size: number of train samples per similarity block; must be >= 1.
        bank_dtype: storage type of the normalised train bank, e.g. ``torch.float16`` to halve its memory
            (similarities are still computed at float32 or better, a chunk at a time). Default: the compute type.
        device: where the bank is kept and the similarities computed (default: ``train_features.device``).

    Returns:
        ``{k: (top1, top5)}`` for every ``k`` in ``ks`` (as given, before clamping), as fractions in
        ``[0, 1]``. With fewer than 5 classes, top-5 counts all classes and is therefore 1.0.

    Raises:
        ValueError: on mismatched shapes, an empty train or test set, ``k < 1``, labels outside
            ``[0, num_classes)``, or a non-positive ``temperature`` / ``chunk_size`` / ``train_chunk_size``.
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
    if train_chunk_size < 1:
        raise ValueError(f"train_chunk_size must be >= 1, got {train_chunk_size}")

    device = torch.device(device) if device is not None else train_features.device
    dtype = float_dtype(train_features, test_features)
    # Unit-norm rows turn the matrix product into cosine similarity.
    train = normalized_bank(train_features, bank_dtype or dtype, device, train_chunk_size)
    train_labels = train_labels.to(device=device, dtype=torch.long)
    num_train, num_test = train.shape[0], test_features.shape[0]
    clamped = {k: min(k, num_train) for k in ks}
    max_k = max(clamped.values())

    correct = {k: [0, 0] for k in ks}
    for start in range(0, num_test, chunk_size):
        test = F.normalize(test_features[start : start + chunk_size].to(device, dtype), dim=1)
        labels = test_labels[start : start + chunk_size].to(device=device, dtype=torch.long)
        # Sorted by similarity, so the k nearest are always a prefix.
        top_sim, top_index = nearest_neighbors(test, train, max_k, train_chunk_size, dtype)  # (chunk, max_k)
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
