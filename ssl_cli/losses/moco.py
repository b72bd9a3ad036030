"""MoCo's contrastive loss against a queue of keys, and the queue itself.

[0] MoCo, He et al. 2019, arXiv:1911.05722, Eq. (1) and Algorithm 1.
[1] MoCo v2, Chen et al. 2020, arXiv:2003.04297.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_cli.precision import fp32


class KeyQueue(nn.Module):
    """A FIFO dictionary of K normalised keys (K x D buffer): the newest batch replaces the oldest keys.

    The queue and its pointer are buffers, so they are saved in checkpoints and restored on resume.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        # random unit vectors until real keys arrive, as in the reference implementation
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """keys: B x D. Written at the pointer (wrapping around), then the pointer advances by B."""
        size = self.keys.shape[0]
        b = keys.shape[0]
        if b > size:  # only the newest ``size`` keys fit
            keys, b = keys[-size:], size
        idx = (self.ptr + torch.arange(b, device=keys.device)) % size
        self.keys[idx] = keys.detach().to(self.keys.dtype)
        self.ptr.copy_((self.ptr + b) % size)


@fp32
def moco_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits of each query against its positive key (column 0) and the K queued negatives: N x (1 + K), in
    fp32 even under bf16 autocast (``ssl_cli.precision``).

    Args:
        q: N x D normalised queries.
        k: N x D normalised positive keys (no gradient flows into them).
        queue: K x D normalised negative keys.
    """
    l_pos = (q * k).sum(dim=1, keepdim=True)  # N x 1
    l_neg = q @ queue.T  # N x K
    return torch.cat([l_pos, l_neg], dim=1) / temperature


def moco_contrastive(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with one positive key and K queued negatives (shapes as in ``moco_logits``).

    Returns:
        mean over N of -log( exp(q.k+/tau) / (exp(q.k+/tau) + sum_j exp(q.queue_j/tau)) ).
    """
    return positive_first_cross_entropy(moco_logits(q, k, queue, temperature))


@fp32
def positive_first_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of N x (1 + K) logits whose positive is column 0 for every row."""
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))
