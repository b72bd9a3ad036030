"""YADIM's NCE with the sum over positives in the numerator, between the last feature maps of two views.

One direction (``nce_sum_positives``): anchors a_{i,l} (every location l of image i's map in one view, this
process's images: N x D x La) against the other view's maps t_{j,l'} (every image j of the global batch, every
location l'; M x D x Lb). With the dot product as similarity [0, Sec. 5 (4)], scaled as set by ``score_scale``:

- s_{i,l,j,l'} = a_{i,l} . t_{j,l'} x c, with c = 1 / sqrt(D) (``score_scale = "sqrt_dim"``) or 1 (``"none"``);
  with ``similarity = "cosine"`` (the framework's other choice [0, Sec. 4 (4)], SimCLR's): instead
  s = cos(a_{i,l}, t_{j,l'}) / temperature;
  then, with ``tclip > 0``, the soft clip tclip x tanh(s / tclip) (0: no clip);
- the positive set R+ of anchor (i, l): every location of image i's map in the other view; the negative set R-:
  every location of every other image j != i in the other view;
- N_{i,l} = -log( sum_{l'} exp(s_{i,l,i,l'}) / D_{i,l} ), the paper's formula [0, Sec. 5 (5)], where the
  denominator D_{i,l} is
  - ``denominator = "negatives"``: sum_{j != i, l'} exp(s_{i,l,j,l'}), the negatives only, as the formula reads;
  - ``denominator = "all"`` (the default): the positives' sum added to it, sum_{j, l'} exp(s_{i,l,j,l'}), the
    usual practice of NCE / InfoNCE (and of AMDIM's NCE, which the YADIM code of the paper's authors reuses): the
    term is then a cross-entropy, >= 0, and cannot be lowered without bound by inflating the positive scores alone
    (with the negatives only and no clip, -log(pos / neg) -> -inf as the positives' scores grow);
- the direction's value is the mean of N_{i,l} over every anchor (i, l).

A sum over the positives is not the mean of single-positive NCE terms: with several positives, -log of the summed
exponentials is below every single-positive term's -log (the log-sum-exp is above each score), and the anchors are
pulled towards the set, not towards each location. ``yadim_loss`` takes both views' last maps and averages the two
directions (view 1's anchors against view 2's sets, and back). Scores and log-sum-exps run in fp32 with autocast off
(``ssl_cli.precision``).

Under torchrun the targets are the global batch's maps, gathered with their gradient, and each process's anchors
are its own images, so the negatives are every other image of the global batch.

[0] A Framework For Contrastive Self-Supervised Learning And Designing A New Approach, Falcon & Cho 2020,
    arXiv:2009.00104, Sec. 5 (YADIM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ssl_cli.distributed import gather_with_grad, rank
from ssl_cli.losses.amdim import tanh_clip
from ssl_cli.precision import fp32

Denominator = Literal["all", "negatives"]
ScoreScale = Literal["sqrt_dim", "none"]
Similarity = Literal["dot", "cosine"]


@dataclass(frozen=True)
class Scoring:
    """How a pair of feature vectors becomes a score (the framework's similarity, part 4)."""

    similarity: Similarity = "dot"
    score_scale: ScoreScale = "sqrt_dim"
    """Dot products only: divided by sqrt(D) (``sqrt_dim``) or not (``none``)."""
    temperature: float = 0.1
    """Cosine only: the cosine divided by it."""
    tclip: float = 20.0
    """Soft clip tclip x tanh(s / tclip) after either; 0: none."""


def pair_scores(anchors: torch.Tensor, targets: torch.Tensor, scoring: Scoring) -> torch.Tensor:
    """``anchors`` N x D x La, ``targets`` M x D x Lb -> scores N x La x M x Lb (scaled and clipped)."""
    n, d, la = anchors.shape
    m, _, lb = targets.shape
    if scoring.similarity == "cosine":
        anchors, targets = F.normalize(anchors, dim=1), F.normalize(targets, dim=1)
    flat_a = anchors.permute(0, 2, 1).reshape(n * la, d)
    flat_t = targets.permute(1, 0, 2).reshape(d, m * lb)  # image-major columns
    scores = (flat_a @ flat_t).view(n, la, m, lb)
    if scoring.similarity == "cosine":
        scores = scores / scoring.temperature
    elif scoring.score_scale == "sqrt_dim":
        scores = scores / math.sqrt(d)
    return tanh_clip(scores, scoring.tclip) if scoring.tclip > 0 else scores


def nce_sum_positives(
    anchors: torch.Tensor,
    targets: torch.Tensor,
    offset: int,
    scoring: Scoring = Scoring(),
    denominator: Denominator = "all",
) -> torch.Tensor:
    """One direction: anchor image i's positives are target image ``offset + i``'s locations, its negatives every
    location of the other targets; the mean over anchors of -log(sum exp(positives) / denominator), see the module
    doc."""
    n = anchors.shape[0]
    scores = pair_scores(anchors, targets, scoring)  # N x La x M x Lb
    rows = torch.arange(n, device=anchors.device)
    own = torch.zeros(n, 1, scores.shape[2], 1, dtype=torch.bool, device=anchors.device)
    own[rows, 0, offset + rows] = True
    positives = torch.logsumexp(scores.masked_fill(~own, float("-inf")).flatten(2), dim=2)  # N x La
    if denominator == "negatives":
        scores = scores.masked_fill(own, float("-inf"))
    return (torch.logsumexp(scores.flatten(2), dim=2) - positives).mean()


@fp32  # dot products over D channels and log-sum-exps over M x L entries: fp32 (ssl_cli.precision)
def yadim_loss(
    maps: list[torch.Tensor],
    scoring: Scoring = Scoring(),
    denominator: Denominator = "all",
) -> dict[str, torch.Tensor]:
    """YADIM's loss for two views: ``maps`` are the two views' last feature maps, N x D x H x W each (this
    process's images). Returns ``nce_12`` (view 1's anchors), ``nce_21`` and their mean, ``loss``."""
    n = maps[0].shape[0]
    offset = rank() * n
    flat = [m.flatten(2) for m in maps]
    targets = [gather_with_grad(f) for f in flat]  # the global batch's maps
    out = {
        "nce_12": nce_sum_positives(flat[0], targets[1], offset, scoring, denominator),
        "nce_21": nce_sum_positives(flat[1], targets[0], offset, scoring, denominator),
    }
    out["loss"] = 0.5 * (out["nce_12"] + out["nce_21"])
    return out
