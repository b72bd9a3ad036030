"""SwAV: unsupervised learning of visual features by contrasting cluster assignments.

Backbone -> projector (MLP 2048 -> 128) -> L2-normalised feature z; K prototypes (a bias-free linear layer whose
rows are re-normalised before every step) give cosine scores z . c_k. For each global view, codes Q are
computed online from its scores with Sinkhorn-Knopp (equal partition of the batch over the prototypes,
epsilon 0.05, 3 iterations, no gradient); every other view (global or multi-crop local) predicts that code from
its own scores (softmax at tau 0.1). Small crops are only ever predictors, never targets. A FIFO queue of past
global-view features can join the Sinkhorn problem for small batches (from ``queue_start_epoch``, once full);
the prototypes get no update during the first ``freeze_prototypes_epochs``.

[0] SwAV, Caron, Misra, Mairal, Goyal, Bojanowski, Joulin 2020, arXiv:2006.09882; official code
    facebookresearch/swav (main_swav.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ssl_cli.config.schema import PositiveInt
from ssl_cli.distributed import gather, rank
from ssl_cli.heads import ProjectorConfig, projector
from ssl_cli.losses.swav import prototype_scores, sinkhorn, swapped_prediction
from ssl_cli.methods.base import Method, StepOutput
from ssl_cli.methods.multicrop import check_num_targets, encode_then_head
from ssl_cli.methods.registry import register


class SwAVConfig(ProjectorConfig):
    name: Literal["swav"] = "swav"
    num_prototypes: PositiveInt = 3000
    temperature: Annotated[float, Field(gt=0.0)] = 0.1
    epsilon: Annotated[float, Field(gt=0.0)] = 0.05
    """Sinkhorn's entropic regularisation (smaller: harder codes)."""
    sinkhorn_iterations: PositiveInt = 3
    queue_size: Annotated[int, Field(ge=0)] = 0
    """Past global-view features per target view joining the Sinkhorn problem (0: no queue; 3840 in the
    paper's batch-256 runs)."""
    queue_start_epoch: Annotated[int, Field(ge=0)] = 15
    freeze_prototypes_epochs: Annotated[float, Field(ge=0.0)] = 1.0
    num_targets: Annotated[int, Field(ge=1)] = 2
    """The first ``num_targets`` views (the global crops) get codes; all views predict."""


@register
class SwAV(Method):
    Config = SwAVConfig
    description = "SwAV (2020): online Sinkhorn codes over 3000 prototypes, swapped prediction, multi-crop"
    num_views = 2
    multi_crop = True
    demo_overrides = {"method.num_prototypes": 100, "method.freeze_prototypes_epochs": 0.5}

    def __init__(self, config: SwAVConfig, backbone, recipe) -> None:
        super().__init__(config, backbone, recipe)
        check_num_targets(config.num_targets, recipe.num_views, "views with codes")
        self.projector, dim = projector(config, self.feature_dim)
        self.prototypes = nn.Linear(dim, config.num_prototypes, bias=False)
        self.register_buffer("queue", torch.zeros(config.num_targets, config.queue_size, dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.int64))
        self._new_features: torch.Tensor | None = None

    def _epoch(self, step: int, total_steps: int) -> float:
        return step * self.recipe.train.epochs / max(total_steps, 1)

    def queue_active(self) -> bool:
        return self.config.queue_size > 0 and int(self.queue_filled) >= self.config.queue_size

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def training_step(self, views: list[torch.Tensor], step: int, index: torch.Tensor | None = None) -> StepOutput:
        self.normalize_prototypes()
        # the projector runs once over every crop's features, as the official forward_head; from its (bf16 under
        # autocast) output on, fp32: normalisation, prototype scores, Sinkhorn, loss (ssl_cli.precision)
        z = [F.normalize(f.float(), dim=1) for f in encode_then_head(self.backbone, self.projector, views)]
        scores = [prototype_scores(v, self.prototypes.weight) for v in z]
        codes = []
        for i in range(self.config.num_targets):
            s = scores[i].detach()
            # the queue holds every rank's past features (the same on all ranks): it joins the global Sinkhorn
            # problem once, through rank 0
            if self.queue_active() and rank() == 0:
                s = torch.cat([prototype_scores(self.queue[i], self.prototypes.weight.detach()), s])
            codes.append(sinkhorn(s, self.config.epsilon, self.config.sinkhorn_iterations)[-len(views[i]) :])
        if self.config.queue_size > 0:  # written after the step; every rank's features, so all queues agree
            self._new_features = torch.stack([gather(z[i].detach()) for i in range(self.config.num_targets)])
        loss = swapped_prediction(scores, codes, self.config.temperature)
        return StepOutput(loss, {"code_entropy": _mean_entropy(codes[0])})

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        if self._epoch(step, total_steps) < self.config.freeze_prototypes_epochs:
            self.prototypes.weight.grad = None  # no update at all (no weight decay, no momentum) yet

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        new, self._new_features = self._new_features, None
        if new is None or self._epoch(step + 1, total_steps) < self.config.queue_start_epoch:
            return
        n = min(new.shape[1], self.config.queue_size)
        self.queue.copy_(torch.cat([new[:, -n:].to(self.queue.dtype), self.queue[:, : self.config.queue_size - n]], 1))
        self.queue_filled.copy_(torch.clamp(self.queue_filled + n, max=self.config.queue_size))


def _mean_entropy(q: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the codes (log K: uniform, 0: hard assignments), a monitor of how peaked they are."""
    return -(q * q.clamp_min(1e-12).log()).sum(dim=1).mean().detach()
