"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

[0] SimCLR, Chen et al. 2020, arXiv:2002.05709, Eq. (1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_cli.distributed import gather_with_grad, rank
from ssl_cli.precision import fp32


class NTXentLoss(nn.Module):
    """For 2N views, each view's positive is the other view of its image; the 2(N-1) other views are negatives.

    loss = mean over the 2N anchors of -log( exp(s(i, pos)/tau) / sum_{k != i} exp(s(i, k)/tau) ),
    with s the cosine similarity. Optional extra ``negatives`` (K x D, e.g. SimCLR v2's queue of momentum
    keys [1]) join every anchor's denominator: + sum_j exp(s(i, neg_j)/tau).

    [1] SimCLR v2, Chen et al. 2020, arXiv:2006.10029, Sec. 2.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    @fp32  # logits / tau in bf16 would put ~2% error into the gradient at tau 0.1 (ssl_cli.precision)
    def forward(self, z1: torch.Tensor, z2: torch.Tensor, negatives: torch.Tensor | None = None) -> torch.Tensor:
        """z1, z2: N x D projections of the two views (row i of each from image i); ``negatives``: K x D
        extra negatives shared by all anchors (no gradient flows into them). Returns a scalar, computed in fp32
        even under bf16 autocast.

        Under torchrun the anchors are this rank's 2N views and the candidates are the 2N x W views of the
        global batch, gathered with their gradient, as the reference does on TPU pods [0, Sec. 2].
        """
        n = z1.shape[0]
        z = F.normalize(torch.cat([z1, z2]), dim=1)  # 2N x D: this rank's anchors
        candidates = gather_with_grad(z)  # 2N W x D, rank r's block at rows r 2N .. (r + 1) 2N
        offset = rank() * 2 * n
        logits = z @ candidates.T / self.temperature  # 2N x 2N W
        rows = torch.arange(2 * n, device=z.device)
        # an anchor is never its own negative: remove its own column from the softmax
        logits[rows, offset + rows] = float("-inf")
        if negatives is not None:  # columns 2N W.. : the extra negatives; the targets stay in the first 2N W
            extra = z @ F.normalize(negatives.detach().to(z.dtype), dim=1).T / self.temperature  # 2N x K
            logits = torch.cat([logits, extra], dim=1)
        targets = offset + (rows + n) % (2 * n)  # the twin: the other view of the same image
        return F.cross_entropy(logits, targets)
