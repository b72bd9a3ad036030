"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

[0] SimCLR, Chen et al. 2020, arXiv:2002.05709, Eq. (1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NTXentLoss(nn.Module):
    """For 2N views, each view's positive is the other view of its image; the 2(N-1) other views are negatives.

    loss = mean over the 2N anchors of -log( exp(s(i, pos)/tau) / sum_{k != i} exp(s(i, k)/tau) ),
    with s the cosine similarity.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """z1, z2: N x D projections of the two views (row i of each from image i). Returns a scalar."""
        n = z1.shape[0]
        z = F.normalize(torch.cat([z1, z2]), dim=1)  # 2N x D
        logits = z @ z.T / self.temperature  # 2N x 2N
        # an anchor is never its own negative: remove the diagonal from the softmax
        logits.fill_diagonal_(float("-inf"))
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(logits, targets)
