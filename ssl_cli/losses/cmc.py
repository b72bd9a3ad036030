"""CMC's cross-view contrast: which views are contrasted with which, and the in-batch form of the loss.

For two views V1, V2 of a data set, CMC trains the embedding of each view to pick its own image's embedding of the
other view out of negatives (other images' embeddings of that view) [0, Eq. (2)-(3)]:
L(V1, V2) = L_contrast(anchor V1, candidates V2) + L_contrast(anchor V2, candidates V1). With M > 2 views [0, Sec. 3.3]:

- ``core``: one view (the first, e.g. L) is the core; L_C = sum over j > 1 of L(V1, Vj): 2 (M - 1) directed terms;
- ``full``: the full graph; L_F = sum over all pairs i < j of L(Vi, Vj): M (M - 1) directed terms.

The candidates come from a memory bank per view with NCE (the bank's read and update are
``ssl_cli.losses.instdisc``'s) or, ``cross_view_infonce``, from the batch itself: anchor i of view a against every
image's view-b embedding in the global batch, softmax cross-entropy with its own image as the label.

[0] Contrastive Multiview Coding (CMC), Tian, Krishnan, Isola 2019, arXiv:1906.05849, Sec. 3.1-3.3.
[1] Official code github.com/HobbitLong/CMC (NCE/NCEAverage.py, NCE/NCECriterion.py ``NCESoftmaxLoss``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ssl_cli.distributed import gather_with_grad, rank
from ssl_cli.precision import fp32

Pairs = Literal["core", "full"]


def cross_view_pairs(num_views: int, pairs: Pairs) -> list[tuple[int, int]]:
    """The directed (anchor view, candidate view) terms, each pair in both directions: view 0 with each other view
    (``core``), or every two views (``full``). With two views both are [(0, 1), (1, 0)]."""
    if pairs == "core":
        undirected = [(0, j) for j in range(1, num_views)]
    else:
        undirected = [(i, j) for i in range(num_views) for j in range(i + 1, num_views)]
    return [d for i, j in undirected for d in ((i, j), (j, i))]


@fp32
def cross_view_infonce(anchor: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """In-batch InfoNCE of one direction: this rank's anchors (N x D, one view) against every rank's candidates (the
    global batch's other view, gathered with their gradient), ``-mean log softmax(anchor . candidates / tau)`` at the
    anchor's own image. Both views train through it. In fp32 even under bf16 autocast."""
    everyone = gather_with_grad(candidates)
    logits = anchor @ everyone.T / temperature  # N x (world N)
    labels = torch.arange(anchor.shape[0], device=anchor.device) + rank() * anchor.shape[0]
    return F.cross_entropy(logits, labels)
