"""MoCo v3's contrastive loss: in-batch keys from the momentum encoder, no queue.

[0] MoCo v3, Chen, Xie, He 2021, arXiv:2104.02057, Algorithm 1; official code facebookresearch/moco-v3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_cli.distributed import gather, rank
from ssl_cli.precision import fp32


@fp32  # a .float() cast alone does nothing under autocast: the matmul would still run in bf16
def mocov3_contrastive(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of N x M logits q . k / tau (M = the global batch's keys), labels on the diagonal, times 2 tau.

    ``q``: this rank's N queries (gradient flows); ``k``: its N keys (no gradient; every rank's keys are the
    candidates under torchrun, the positive of query i being its own image's key). The 2 tau factor makes the
    gradient scale independent of tau, as in the paper. Computed in fp32 even under bf16 autocast.
    """
    q = F.normalize(q, dim=1)
    keys = F.normalize(gather(k), dim=1)
    logits = q @ keys.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)
