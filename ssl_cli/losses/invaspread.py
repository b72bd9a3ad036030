"""InvaSpread's softmax embedding loss over a batch of N images and their N augmented copies.

For anchor a among the 2N samples, with twin t(a) (its other view) and s the cosine similarity,
P(b|a) = exp(s(a, b)/tau) / sum_{k != a} exp(s(a, k)/tau). Each anchor's loss is
-log P(t(a)|a) - sum_{b not in {a, t(a)}} log(1 - P(b|a)): the positive is recognised as the anchor's instance
(invariance) and no other sample is (spreading). The loss is the mean over the 2N anchors.

This is the paper's Eq. (5) made symmetric over both halves, as the official ``BatchCriterion`` (negM = 1)
computes it: every one of the 2N samples is an anchor and the denominator runs over the 2N - 1 others.

[0] InvaSpread, Ye, Zhang, Yuen, Chang 2019, arXiv:1904.03436, Eq. (2)-(5); official code
    mangye16/Unsupervised_Embedding_Learning (BatchAverage.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_cli.distributed import gather, gather_with_grad, rank
from ssl_cli.precision import fp32


@fp32  # similarities, softmax and log(1 - P) in fp32 under bf16 autocast (ssl_cli.precision)
def invaspread_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float, detach_keys: bool = False) -> torch.Tensor:
    """z1, z2: N x D embeddings of the two views (row i of each from image i). Returns a scalar.

    ``detach_keys``: the non-anchor side of each similarity gets no gradient, as in the official code (its
    ``BatchAverage`` reads the other samples from ``feat.data``); every sample still gets a gradient as an anchor.
    """
    n = z1.shape[0]
    z = torch.cat([z1, z2])
    z = F.normalize(z, dim=1)  # 2N x D, fp32 (half-precision inputs arrive cast) or fp64
    # under torchrun the other samples are the whole global batch (rank r's 2N rows at r 2N ..)
    keys = gather(z) if detach_keys else gather_with_grad(z)
    offset = rank() * 2 * n
    logits = z @ keys.T / temperature  # row a: anchor a against every sample
    rows = torch.arange(2 * n, device=z.device)
    own, twin = offset + rows, offset + (rows + n) % (2 * n)
    logits[rows, own] = float("-inf")
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # log P(b|a), -inf on the anchor itself
    log_pos = log_p[rows, twin]
    negative = torch.ones_like(log_p, dtype=torch.bool)
    negative[rows, own] = False
    negative[rows, twin] = False
    # log(1 - P) = log(-expm1(log P)), exact for small P; the clamp keeps it finite if P rounds to 1
    log_not = torch.log((-torch.expm1(log_p[negative])).clamp_min(1e-30))
    return -(log_pos.sum() + log_not.sum()) / (2 * n)
