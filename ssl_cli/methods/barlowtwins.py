"""Barlow Twins: self-supervised learning by redundancy reduction.

Two differently augmented views pass through one encoder and a wide projector (8192-8192-8192, BatchNorm +
ReLU in the hidden layers, no biases); each view's embeddings are batch-normalised without affine
parameters, and their cross-correlation matrix C (D x D) is pushed towards the identity:
sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2. No negatives, no momentum encoder, no stop-gradient.
Trained with LARS; biases and BatchNorm parameters get 0.0048 / 0.2 = 0.024 times the weights' rate.

[0] Barlow Twins, Zbontar, Jing, Misra, LeCun, Deny 2021, arXiv:2103.03230.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from ssl_cli.config.schema import PositiveInt
from ssl_cli.errors import RecipeError
from ssl_cli.heads import LastNorm, ProjectorConfig, projector
from ssl_cli.losses.barlow import BarlowTwinsLoss
from ssl_cli.methods.base import Method, StepOutput
from ssl_cli.methods.registry import register


class BarlowTwinsConfig(ProjectorConfig):
    name: Literal["barlowtwins"] = "barlowtwins"
    lambd: Annotated[float, Field(ge=0.0)] = 5e-3
    """Weight of the off-diagonal (redundancy-reduction) terms (paper: 5e-3; reference code: 0.0051)."""
    scale_loss: Annotated[float, Field(gt=0.0)] = 1.0
    """Multiplies the whole loss (1 in the final reference code; solo-learn's 32x32 recipe: 0.1)."""
    bias_lr_scale: Annotated[float, Field(gt=0.0)] = 0.0048 / 0.2
    """Learning rate of biases and BatchNorm parameters relative to the weights' (paper: 0.0048 vs 0.2)."""
    proj_hidden_dim: PositiveInt = 8192
    proj_output_dim: PositiveInt = 8192
    proj_layers: Annotated[int, Field(ge=2)] = 3
    proj_last_batchnorm: LastNorm = "plain"
    """``plain``: the last Linear has no bias and is followed by BatchNorm without affine parameters, the
    reference's normalisation of z1 and z2 (then the loss does not standardise a second time)."""


@register
class BarlowTwins(Method):
    Config = BarlowTwinsConfig
    description = "Barlow Twins (2021): cross-correlation to identity, 8192-d projector, lambda 5e-3, LARS"
    # a 2048-d projector keeps the CPU demo fast; the 32x32 recipe's loss scale and rate learn in 80 steps
    demo_overrides = {
        "method.proj_hidden_dim": 2048,
        "method.proj_output_dim": 2048,
        "method.scale_loss": 0.1,
        "optim.lr": 0.3,
    }

    def __init__(self, config: BarlowTwinsConfig, backbone, recipe) -> None:
        super().__init__(config, backbone, recipe)
        if config.bias_lr_scale != 1.0 and not recipe.optim.exclude_bias_norm:
            raise RecipeError(
                "method.bias_lr_scale: needs optim.exclude_bias_norm = true (biases and norms in their own group)"
            )
        self.projector, _ = projector(config, self.feature_dim)
        # the reference normalises z1, z2 with BatchNorm1d(affine=False); with a projector that already ends in
        # one ("plain") the embeddings are standardised, otherwise the loss does it
        ends_in_plain_bn = config.projector == "mlp" and config.proj_last_batchnorm == "plain"
        self.loss = BarlowTwinsLoss(config.lambd, config.scale_loss, normalize=not ends_in_plain_bn)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))  # N x D

    def training_step(self, views: list[torch.Tensor], step: int, index: torch.Tensor | None = None) -> StepOutput:
        x1, x2 = views
        # one forward per view, as in the reference: each view's BatchNorm statistics are its own
        z1, z2 = self.embed(x1), self.embed(x2)
        on_diag, off_diag = self.loss.terms(z1, z2)
        return StepOutput(
            self.loss.combine(on_diag, off_diag), {"on_diag": on_diag.detach(), "off_diag": off_diag.detach()}
        )

    def param_groups(self) -> list[dict]:
        """The trainer's decayed / no-decay split; the no-decay group (biases, BN) gets ``bias_lr_scale``."""
        groups = super().param_groups()
        for group in groups:
            if not group["lars_adapt"]:  # the no-decay group of ``param_groups``
                group["lr_scale"] = self.config.bias_lr_scale
        return groups
