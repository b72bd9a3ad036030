"""BYOL: bootstrap your own latent.

An online network (backbone + projector + predictor) predicts the projection that a target network
(an EMA copy of backbone + projector, no gradient) gives for the other view of the same image. Loss:
the normalised MSE ``2 - 2 cos(q(z_online(v)), z_target(v'))``, symmetrised over the two view orders.
After every optimizer step the target follows ``xi <- tau xi + (1 - tau) theta``, with tau rising from
``momentum`` to ``momentum_final`` (1) on a cosine schedule over the run.

As in the official code, the last linear layer of projector and predictor has no bias (``proj_last_bias = false``
in the recipes: haiku's ``Linear(with_bias=False)`` in byol/utils/networks.py), each view is forwarded on its own
(BatchNorm statistics per view) and the target network runs in training mode (its BatchNorm uses batch
statistics, like the online one). With ``backbone.norm = "groupnorm_ws"`` and ``proj_norm = "groupnorm"`` (recipes
``byol-gn``, ``byol-gn-cifar``) no layer uses batch statistics [1].

[0] BYOL, Grill et al. 2020, arXiv:2006.07733.
[1] BYOL works even without batch statistics, Richemond et al. 2020, arXiv:2010.10241.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from ssl_cli.config.schema import PositiveInt, Probability
from ssl_cli.heads import ProjectorConfig, mlp, projector
from ssl_cli.losses.byol import normalized_mse
from ssl_cli.losses.simsiam import normalized_std
from ssl_cli.methods.base import Method, StepOutput
from ssl_cli.methods.momentum import CosineMomentum, CosineMomentumConfig, ema_update, frozen_copy
from ssl_cli.methods.registry import register


class BYOLConfig(ProjectorConfig, CosineMomentumConfig):
    name: Literal["byol"] = "byol"
    proj_hidden_dim: PositiveInt = 4096
    proj_output_dim: PositiveInt = 256
    pred_hidden_dim: PositiveInt = 4096
    """Hidden width of the predictor MLP (proj_output_dim -> pred_hidden_dim -> proj_output_dim)."""
    momentum: Probability = 0.996
    """Target EMA rate (the paper's tau) at step 0; it rises to ``momentum_final`` on a cosine schedule."""
    renamed: ClassVar[dict[str, str]] = {"tau_base": "momentum", "tau_final": "momentum_final"}


@register
class BYOL(Method):
    Config = BYOLConfig
    description = "BYOL (2020): EMA target network, predictor, normalised MSE, no negatives, LARS"
    # 80 steps on the demo: a faster-moving target lets the online network bootstrap within the run
    demo_overrides = {"method.momentum": 0.99}

    def __init__(self, config: BYOLConfig, backbone, recipe) -> None:
        super().__init__(config, backbone, recipe)
        self.projector, dim = projector(config, self.feature_dim)
        # the predictor has the projector's MLP shape and normalisation
        self.predictor = mlp(
            [dim, config.pred_hidden_dim, dim],
            batchnorm=config.proj_batchnorm,
            last_bias=config.proj_last_bias,
            norm=config.proj_norm,
        )
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)
        self._taus = CosineMomentum(config.momentum, config.momentum_final)

    def online(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projection z and prediction q(z) of the online network."""
        z = self.projector(self.backbone(x))
        return z, self.predictor(z)

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_backbone(x))

    def training_step(self, views: list[torch.Tensor], step: int, index: torch.Tensor | None = None) -> StepOutput:
        x1, x2 = views
        z1, p1 = self.online(x1)
        z2, p2 = self.online(x2)
        t1, t2 = self.target(x1), self.target(x2)
        # the official loss: the sum of the two directions, each a batch mean (so between 0 and 8)
        loss = normalized_mse(p1, t2.detach()).mean() + normalized_mse(p2, t1.detach()).mean()
        return StepOutput(loss, {"z_std": 0.5 * (normalized_std(z1) + normalized_std(z2))})

    def tau(self, step: int, total_steps: int) -> float:
        """The target EMA rate after optimizer step ``step`` (0-based) of ``total_steps``."""
        return self._taus(step, total_steps)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        tau = self.tau(step, total_steps)
        ema_update([(self.target_backbone, self.backbone), (self.target_projector, self.projector)], tau)
