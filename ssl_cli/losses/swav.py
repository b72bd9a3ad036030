"""SwAV's online codes (Sinkhorn-Knopp under an equal-partition constraint) and swapped-prediction loss.

[0] SwAV, Caron, Misra, Mairal, Goyal, Bojanowski, Joulin 2020, arXiv:2006.09882, Sec. 3.1 and Eq. (3);
    official code facebookresearch/swav (distributed_sinkhorn).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_cli.distributed import all_reduce_with_grad
from ssl_cli.precision import fp32


@fp32
def prototype_scores(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Scores z . c_k (N x K) of N x D features against K x D prototypes, in fp32 even under bf16 autocast.

    The scores are divided by a temperature of 0.1 (the loss) or an epsilon of 0.05 (Sinkhorn) before an exp: in
    bf16 (rounding up to 2^-8) a score near 1 would be off by up to 8e-2 after the division (``ssl_cli.precision``).
    SwAV's and DeepCluster v2's prototype layers are bias-free, so this is their forward.
    """
    return z @ prototypes.T


@torch.no_grad()
@fp32  # exp(scores / 0.05) and the normalisations in fp32 under bf16 autocast
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Soft codes Q (B x K) for B samples' prototype scores (B x K), each row a distribution over prototypes.

    Q = diag(u) exp(scores / epsilon) diag(v) is pushed towards the transportation polytope where every
    prototype receives B/K of the mass and every sample 1 (Sinkhorn-Knopp, alternating normalisation of the
    prototypes' and the samples' sums). The last normalisation is the samples', so rows sum to exactly 1; the
    prototype sums approach B/K as ``iterations`` grows. Under torchrun B counts every rank's rows (ranks may
    hold different numbers): the prototype sums, the total and B are all-reduced, so every rank computes its
    rows of the global solution.
    """
    # K x B; the scores are cosines (<= 1), so exp(1 / 0.05) stays far from overflow; no per-rank shift, which
    # would scale each rank's columns differently under torchrun
    q = torch.exp(scores.float() / epsilon).T
    q = q / all_reduce_with_grad(q.sum())
    k, b = q.shape[0], all_reduce_with_grad(q.new_tensor(float(q.shape[1])))  # samples over all ranks
    for _ in range(iterations):
        q = q / all_reduce_with_grad(q.sum(dim=1, keepdim=True)) / k  # every prototype: 1/K of the mass
        q = q / q.sum(dim=0, keepdim=True) / b  # every sample: 1/B
    return (q * b).T


@fp32
def swapped_prediction(scores: list[torch.Tensor], codes: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """SwAV's loss: each code (of a global view) is predicted from every *other* view's scores.

    ``scores``: one N x K tensor per view (cosine scores of the normalised features against the prototypes);
    ``codes``: one N x K code per target view, target i being view i. For target i, the loss averages over the
    other views v the cross-entropy -sum_k q_ik log softmax(scores_v / tau)_k (mean over samples); the result
    averages over the targets. Computed in fp32 even under bf16 autocast.
    """
    total = scores[0].new_zeros(())
    for i, q in enumerate(codes):
        others = [v for v in range(len(scores)) if v != i]
        sub = sum(-(q * F.log_softmax(scores[v].float() / temperature, dim=1)).sum(dim=1).mean() for v in others)
        total = total + sub / len(others)
    return total / len(codes)
