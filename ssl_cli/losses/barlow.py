"""The Barlow Twins loss: the cross-correlation of two views' embeddings pushed towards the identity.

[0] Barlow Twins, Zbontar, Jing, Misra, LeCun, Deny 2021, arXiv:2103.03230, Eq. (1)-(2).
"""

from __future__ import annotations

import torch
from torch import nn

from ssl_cli.distributed import all_reduce_with_grad, world_size
from ssl_cli.precision import full_precision


def standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each feature (column) to zero mean and unit variance over the batch: BatchNorm without affine parameters.

    Uses the biased variance and ``eps`` inside the square root, exactly as ``BatchNorm1d(affine=False)`` in
    training mode (what the reference applies to both embeddings).
    """
    count = z.shape[0] * world_size()  # under torchrun: the statistics of the global batch
    mean = all_reduce_with_grad(z.sum(dim=0, keepdim=True)) / count
    var = all_reduce_with_grad((z - mean).pow(2).sum(dim=0, keepdim=True)) / count
    return (z - mean) / torch.sqrt(var + eps)


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """C = z1n^T z2n / N (D x D) for N x D embeddings; ``normalize=False`` when they are already standardised.

    Computed in float32 even under bf16 autocast (8192 x 8192 sums of products need the precision).
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"cross_correlation: expected two N x D tensors of one shape, got {z1.shape}, {z2.shape}")
    with full_precision(z1):
        z1, z2 = z1.float(), z2.float()
        if normalize:
            z1, z2 = standardize(z1), standardize(z2)
        # under torchrun: summed over the ranks, so C is the global batch's (its gradient reaches every rank)
        return all_reduce_with_grad(z1.T @ z2) / (z1.shape[0] * world_size())


class BarlowTwinsLoss(nn.Module):
    """``scale * (sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2)`` with C the views' cross-correlation.

    The invariance term pulls each feature's correlation across the two views to 1; the redundancy-reduction
    term (weighted by ``lambd``, 5e-3 in the paper) decorrelates different features. ``scale`` multiplies the
    whole loss (1 in the final reference code; small-image recipes use 0.1). ``normalize``: standardise each
    feature over the batch first (leave it on unless the embeddings come out of a parameter-free BatchNorm).
    """

    def __init__(self, lambd: float = 5e-3, scale: float = 1.0, normalize: bool = True) -> None:
        super().__init__()
        self.lambd = lambd
        self.scale = scale
        self.normalize = normalize

    def terms(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unweighted on-diagonal sum_i (1 - C_ii)^2 and off-diagonal sum_{i != j} C_ij^2."""
        c = cross_correlation(z1, z2, self.normalize)
        diag = torch.diagonal(c)
        on_diag = (1.0 - diag).pow(2).sum()
        off_diag = c.pow(2).sum() - diag.pow(2).sum()
        return on_diag, off_diag

    def combine(self, on_diag: torch.Tensor, off_diag: torch.Tensor) -> torch.Tensor:
        """The loss from the two terms of ``terms``."""
        return self.scale * (on_diag + self.lambd * off_diag)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """z1, z2: N x D embeddings of the two views (row i of each from image i). Returns a scalar."""
        return self.combine(*self.terms(z1, z2))
