"""SimSiam's symmetric negative-cosine loss with stop-gradient on the targets.

[0] SimSiam, Chen & He 2020, arXiv:2011.10566, Eq. (1)-(4) and Algorithm 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_cli.precision import fp32


@fp32  # on CUDA autocast runs cosine_similarity in fp32 but on the CPU in bf16: fp32 on both
def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -mean over the batch of cos(p_i, stopgrad(z_i)); p, z: N x D. Returns a scalar."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """L = D(p1, z2) / 2 + D(p2, z1) / 2: each view's prediction regresses the other view's projection."""
    return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)


def normalized_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor: the std over the batch of ``z / ||z||``, averaged over the D channels (detached).

    About ``1/sqrt(D)`` when the outputs spread over the sphere, 0 when they collapse to one vector
    [0, Sec. 4.1]. Population std, so a batch of one reads 0, not NaN.
    """
    return F.normalize(z.detach().float(), dim=1).std(dim=0, correction=0).mean()
