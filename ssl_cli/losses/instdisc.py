"""InstDisc's memory bank and its NCE loss (non-parametric instance discrimination).

A bank holds one normalised feature v_i per training image. For a batch feature f of image i, the
non-parametric softmax is P(i|f) = exp(v_i . f / tau) / Z, with the constant Z estimated once (from the
first batch) instead of summing over all n entries. NCE turns the n-way classification into binary
"data or noise" decisions with m noise samples drawn uniformly from the bank (P_n = 1/n):
h(i, f) = P(i|f) / (P(i|f) + m P_n), and the loss per image is
-log h(i, f_i) - sum_{j in noise} log(1 - h(j, f_i)), averaged over the batch.

[0] InstDisc, Wu, Xiong, Yu, Lin 2018, arXiv:1805.01978, Eq. (2)-(7); official code zhirongw/lemniscate.pytorch
    (NCEAverage, NCECriterion).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssl_cli.distributed import all_reduce_mean
from ssl_cli.precision import full_precision


class MemoryBank(nn.Module):
    """n x D features, one per training image; a persistent buffer, so checkpoints carry it.

    Initialised as the reference: uniform in [-s, s] with s = 1/sqrt(D/3) (so E|v|^2 = 1; the rows are not
    normalised until they are first written).
    """

    def __init__(self, size: int, dim: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim / 3.0)
        bank = torch.rand(size, dim, device=device).mul_(2 * bound).sub_(bound)
        self.register_buffer("features", bank)

    @property
    def size(self) -> int:
        return self.features.shape[0]

    def sample_noise(self, batch_size: int, k: int) -> torch.Tensor:
        """batch_size x k indices drawn uniformly, with replacement (the reference's alias sampler, uniform)."""
        return torch.randint(self.size, (batch_size, k), device=self.features.device)

    def logits(self, idx: torch.Tensor, f: torch.Tensor, temperature: float) -> torch.Tensor:
        """v_j . f / tau for each row's entries ``idx`` (B x (1 + m)) and features ``f`` (B x D): B x (1 + m), in
        fp32 even under bf16 autocast; no gradient reaches the bank."""
        with full_precision(f):
            weights = self.features[idx]  # B x (1 + m) x D
            return torch.bmm(weights, f.float()[:, :, None]).squeeze(2) / temperature

    @torch.no_grad()
    def update(self, index: torch.Tensor, features: torch.Tensor, momentum: float) -> None:
        """v_i <- normalise(momentum * v_i + (1 - momentum) * f_i) for the batch's rows only."""
        mixed = self.features[index] * momentum + features.detach().to(self.features.dtype) * (1.0 - momentum)
        self.features[index] = F.normalize(mixed, dim=1)


@torch.no_grad()
def estimate_z(logits: torch.Tensor, num_samples: int) -> torch.Tensor:
    """The NCE normaliser Z = n * mean of exp(logits) over a batch's B x (1 + m) scores, the mean taken over every
    rank's batch under torchrun (float64 scalar). The reference sets it from the first batch and keeps it fixed."""
    log_mean = torch.logsumexp(logits.double().flatten(), 0) - math.log(logits.numel())
    return all_reduce_mean(log_mean.exp()) * num_samples


def nce_loss(log_p: torch.Tensor, num_samples: int) -> torch.Tensor:
    """NCE loss from log P(j|f) of each row's data sample (column 0) and its m noise samples (columns 1..m).

    Args:
        log_p: B x (1 + m), ``v_j . f / tau - log Z``.
        num_samples: n, the bank size (noise distribution P_n = 1/n).

    Returns:
        -(sum_b [log h_b0 + sum_j log(1 - h_bj)]) / B with h = P / (P + m/n). Computed in log space
        (log h = -softplus(log(m/n) - log P), log(1 - h) = -softplus(log P - log(m/n))), so the reference's
        eps = 1e-7 guard is not needed.
    """
    m = log_p.shape[1] - 1
    log_noise = math.log(m / num_samples)  # log(m P_n)
    log_h_data = -F.softplus(log_noise - log_p[:, 0])
    log_1m_h_noise = -F.softplus(log_p[:, 1:] - log_noise)
    return -(log_h_data.sum() + log_1m_h_noise.sum()) / log_p.shape[0]
