"""DeepCluster v2's targets and loss: spherical k-means on a feature memory, then prediction of the clusters.

Spherical k-means (cosine similarity, centroids on the unit sphere): centroids start at ``k`` distinct random
rows of the data; each iteration assigns every row to its most similar centroid (E step) and moves every
non-empty cluster's centroid to the normalised mean of its members (M step; an empty cluster keeps its
centroid); after the last iteration one more E step gives the assignments that go with the returned
centroids. The loss is a cross-entropy of each view's prototype scores / tau against its image's cluster.

[0] SwAV / DeepCluster v2, Caron, Misra, Mairal, Goyal, Bojanowski, Joulin 2020, arXiv:2006.09882, Appendix
    (DeepCluster-v2); official code facebookresearch/swav (main_deepclusterv2.py: cluster_memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_cli.precision import fp32

NO_CLUSTER = -1
"""The target of an image with no assignment (not in the memory yet): ignored by the loss."""

# rows x centroids similarities materialised at once: 2^24 floats (64 MiB), so ImageNet's 1.28M rows x 3000
# centroids (15 GiB as one matrix) run in slices
_CHUNK_ELEMENTS = 1 << 24


@torch.no_grad()
def spherical_kmeans(
    x: torch.Tensor, k: int, iterations: int = 10, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of ``x`` (N x D, L2-normalised) into ``k`` clusters by cosine similarity.

    Args:
        x: N x D unit rows (DeepCluster v2's feature memory of one view).
        k: the number of clusters (prototypes).
        iterations: E + M steps; a final E step follows them.
        generator: draws the initial centroids (CPU generator): rows ``randperm(N)[:k]`` of ``x``. With fewer rows
            than clusters (tiny data, ``ssl bench``) every row starts a centroid and the others start at repeated
            rows, empty at first (a tie goes to the lowest centroid index).

    Returns:
        ``(centroids, assignments)``: k x D unit centroids and N int64 indices, every row's most similar centroid.

    Every operation is deterministic for a given device (cluster sums are matrix products, not scattered atomic
    adds), so processes with the same memory and generator seed compute bit-identical clusters.
    """
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one row")
    x = x.float()
    first = torch.randperm(n, generator=generator)
    if n < k:
        first = torch.cat([first, torch.randint(n, (k - n,), generator=generator)])
    centroids = F.normalize(x[first[:k].to(x.device)], dim=1)
    for it in range(iterations + 1):
        assignments = nearest_centroid(x, centroids)
        if it == iterations:
            break
        sums = _cluster_sums(x, assignments, k)
        counts = torch.bincount(assignments, minlength=k)
        centroids = torch.where((counts > 0)[:, None], F.normalize(sums, dim=1), centroids)
    return centroids, assignments


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """For each row of ``x`` (N x D) the index of the centroid (k x D) with the largest dot product (N int64)."""
    rows = max(1, _CHUNK_ELEMENTS // centroids.shape[0])
    return torch.cat([(part @ centroids.T).argmax(dim=1) for part in x.split(rows)])


def _cluster_sums(x: torch.Tensor, assignments: torch.Tensor, k: int) -> torch.Tensor:
    """k x D: the sum of each cluster's rows, as one-hot(assignments)^T @ x in slices (deterministic on CUDA,
    where ``index_add_`` would add in a random order)."""
    rows = max(1, _CHUNK_ELEMENTS // k)
    sums = x.new_zeros(k, x.shape[1])
    for part, a in zip(x.split(rows), assignments.split(rows), strict=True):
        one_hot = torch.zeros(a.shape[0], k, device=x.device, dtype=x.dtype).scatter_(1, a[:, None], 1.0)
        sums += one_hot.T @ part
    return sums


@fp32
def cluster_prediction(scores: list[torch.Tensor], targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """DeepCluster v2's loss: every view predicts its image's cluster, for each set of prototypes (head).

    Args:
        scores: one (V*B) x K_h tensor per head h, the cosine scores of the V views' normalised features against
            the head's prototypes, views stacked in order (view v's rows are ``v*B ... v*B + B - 1``).
        targets: H x B int64, image b's cluster in head h; ``NO_CLUSTER`` (-1) where it has none.
        temperature: tau, the scores' softmax temperature.

    Returns:
        The mean over heads of the cross-entropy of softmax(scores / tau) against the targets, each head's term
        averaged over the (view, image) pairs that have a target (every view of an image shares its target, local
        crops included). 0 when no image of the batch has a target. Computed in fp32 even under bf16 autocast.
    """
    total = scores[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(scores, targets, strict=True):
        t = t.repeat(s.shape[0] // t.shape[0])  # V*B: the same target for every view of an image
        ce = F.cross_entropy(s.float() / temperature, t, ignore_index=NO_CLUSTER, reduction="sum")
        total = total + ce / (t != NO_CLUSTER).sum().clamp_min(1)
    return total / len(scores)
