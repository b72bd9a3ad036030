"""AMDIM's NCE between global and local features across two views, with soft-clipped scores and a score penalty.

One term (``nce_g2l``): sources s_i (one vector per image i of this process, N x D) against the target map of the
other view, t_{j,l} (every image j of the global batch, every location l; M x D x L). With
raw_{i,j,l} = s_i . t_{j,l} / sqrt(D):

- penalty: ``score_reg`` x mean(raw^2) over every (i, j, l), taken before the clipping;
- scores: c = tclip x tanh(raw / tclip), a soft clip to [-tclip, tclip];
- each location of image i's own target map is a positive, the negatives are every location of every other image
  (shared by the L positives of i; i's other locations are not among them):
  nce_{i,l} = c_{i,i,l} - log( exp(c_{i,i,l}) + sum_{j != i, l'} exp(c_{i,j,l'}) );
- the term is -mean over i and l of nce_{i,l}.

``amdim_loss`` makes AMDIM's three costs from both views' features, each the mean of its two directions (view 1
predicts view 2, and back) [1, costs.py ``LossMultiNCE`` / ``NCE_MI_MULTI``]:

- ``1t5``: global features r1 (N x D) predict the other view's 5x5 map r5;
- ``1t7``: r1 predicts the other view's 7x7 map r7;
- ``5t5``: one location of a view's own r5 map, drawn at random per image, predicts the other view's r5 map.

The loss trained is their sum plus the penalty, ``g2l_1t5 + g2l_1t7 + g2l_5t5 + lgt_reg``, summed as the reference
trains it (task_self_supervised.py), where ``lgt_reg`` is the penalty of the six directions summed in pairs and
halved (the mean of both directions, for each of the three costs). Scores, penalty and log-sum-exps run in fp32
with autocast off (``ssl_cli.precision``).

Under torchrun the targets are the global batch's maps, gathered with their gradient, and each process's sources
are its own images (as the reference splits the sources over its GPUs and gives each all targets).

[0] AMDIM, Bachman, Hjelm, Buchwalter 2019, arXiv:1906.00910, Sec. 3.
[1] Official code github.com/Philip-Bachman/amdim-public: costs.py (``tanh_clip``, ``NCE_MI_MULTI._model_scores``:
    the 5e-2 penalty before ``tanh_clip``; ``LossMultiNCE._sample_src_ftr``: one random 5x5 location per image),
    train.py (``--tclip 20``).
"""

from __future__ import annotations

import math

import torch

from ssl_cli.distributed import gather_with_grad, rank
from ssl_cli.precision import fp32

TERMS = ("g2l_1t5", "g2l_1t7", "g2l_5t5")


def tanh_clip(x: torch.Tensor, clip: float) -> torch.Tensor:
    """Soft clip to [-clip, clip]: clip x tanh(x / clip)."""
    return clip * torch.tanh(x / clip)


def nce_g2l(
    sources: torch.Tensor, targets: torch.Tensor, offset: int, tclip: float, score_reg: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction of one cost: ``sources`` N x D, ``targets`` M x D x L (M >= N images of the global batch),
    source i's positives at target image ``offset + i``. Returns (-mean NCE, the penalty); see the module doc."""
    n, (m, d, locations) = sources.shape[0], targets.shape
    flat = targets.permute(1, 0, 2).reshape(d, m * locations)  # D x (M L), image-major columns
    raw = (sources @ flat).view(n, m, locations) / math.sqrt(d)
    penalty = score_reg * raw.pow(2).mean()
    scores = tanh_clip(raw, tclip)
    rows = torch.arange(n, device=sources.device)
    positives = scores[rows, offset + rows]  # N x L
    own = torch.zeros(n, m, 1, dtype=torch.bool, device=sources.device)
    own[rows, offset + rows] = True
    negatives = torch.logsumexp(scores.masked_fill(own, float("-inf")).flatten(1), dim=1, keepdim=True)  # N x 1
    nce = positives - torch.logaddexp(positives, negatives)
    return -nce.mean(), penalty


def sample_locations(maps: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
    """One vector per image: ``maps`` N x D x L at ``locations`` (N indices into L) -> N x D."""
    index = locations.to(maps.device, torch.long)[:, None, None].expand(-1, maps.shape[1], 1)
    return maps.gather(2, index).squeeze(2)


@fp32  # scores / sqrt(D), their squares and log-sum-exps over M x L entries: fp32 (ssl_cli.precision)
def amdim_loss(
    r1: list[torch.Tensor],
    r5: list[torch.Tensor],
    r7: list[torch.Tensor],
    locations: torch.Tensor,
    tclip: float = 20.0,
    score_reg: float = 0.05,
) -> dict[str, torch.Tensor]:
    """AMDIM's costs for two views. ``r1``: per view N x D global features; ``r5``, ``r7``: per view N x D x H x W
    maps (this process's images); ``locations``: 2 x N indices into view v's r5 map (row-major), the 5->5 sources.
    Returns ``g2l_1t5``, ``g2l_1t7``, ``g2l_5t5``, ``lgt_reg`` and their sum, ``loss``."""
    n = r1[0].shape[0]
    offset = rank() * n
    t5 = [gather_with_grad(r.flatten(2)) for r in r5]  # per view: M x D x L5 (the global batch)
    t7 = [gather_with_grad(r.flatten(2)) for r in r7]
    sums = {name: r1[0].new_zeros(()) for name in (*TERMS, "lgt_reg")}
    for a, b in ((0, 1), (1, 0)):  # view a's sources predict view b's targets
        src5 = sample_locations(r5[a].flatten(2), locations[a])
        for name, source, target in (("g2l_1t5", r1[a], t5[b]), ("g2l_1t7", r1[a], t7[b]), ("g2l_5t5", src5, t5[b])):
            term, penalty = nce_g2l(source, target, offset, tclip, score_reg)
            sums[name] = sums[name] + 0.5 * term
            sums["lgt_reg"] = sums["lgt_reg"] + 0.5 * penalty
    sums["loss"] = sums["g2l_1t5"] + sums["g2l_1t7"] + sums["g2l_5t5"] + sums["lgt_reg"]
    return sums
