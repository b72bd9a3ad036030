"""SimSiam: simple Siamese networks, i.e. BYOL without the momentum encoder.

One shared encoder f (backbone + 3-layer projector whose output BatchNorm has no affine parameters) and a
bottleneck predictor h (2048 -> 512 -> 2048). Loss ``D(p1, sg(z2))/2 + D(p2, sg(z1))/2`` with D the negative
cosine similarity and sg the stop-gradient, which is what prevents collapse. The predictor is trained at a
fixed (non-decayed) learning rate. Monitor ``z_std``: the std over the batch of ``z/||z||``, averaged over
channels, about ``1/sqrt(d)`` when healthy and 0 when the outputs collapse (the paper's Fig. 2).

As in the official code, each view is forwarded on its own (BatchNorm statistics per view).

[0] SimSiam, Chen & He 2020, arXiv:2011.10566.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from ssl_cli.config.schema import PositiveInt
from ssl_cli.heads import LastNorm, ProjectorConfig, mlp, projector
from ssl_cli.losses.simsiam import normalized_std, simsiam_loss
from ssl_cli.methods.base import Method, StepOutput
from ssl_cli.methods.param_groups import param_groups
from ssl_cli.methods.registry import register


class SimSiamConfig(ProjectorConfig):
    name: Literal["simsiam"] = "simsiam"
    proj_hidden_dim: PositiveInt = 2048
    proj_output_dim: PositiveInt = 2048
    proj_layers: Annotated[int, Field(ge=2)] = 3
    proj_last_batchnorm: LastNorm = "plain"
    pred_hidden_dim: PositiveInt = 512
    """Bottleneck of the predictor (proj_output_dim -> pred_hidden_dim -> proj_output_dim)."""
    fix_pred_lr: bool = True
    """Keep the predictor at the run's base rate instead of following the schedule (the paper's default)."""


@register
class SimSiam(Method):
    Config = SimSiamConfig
    description = "SimSiam (2020): shared encoder, predictor, stop-gradient, negative cosine, SGD"
    demo_overrides = {}

    def __init__(self, config: SimSiamConfig, backbone, recipe) -> None:
        super().__init__(config, backbone, recipe)
        self.projector, dim = projector(config, self.feature_dim)
        # hidden layer: Linear (no bias) + BN + ReLU; output layer: Linear with bias and no BN
        self.predictor = mlp([dim, config.pred_hidden_dim, dim], batchnorm=True)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projection z = f(x) and prediction p = h(z)."""
        z = self.projector(self.backbone(x))
        return z, self.predictor(z)

    def training_step(self, views: list[torch.Tensor], step: int, index: torch.Tensor | None = None) -> StepOutput:
        x1, x2 = views
        z1, p1 = self.encode(x1)
        z2, p2 = self.encode(x2)
        loss = simsiam_loss(p1, p2, z1, z2)  # detaches z1, z2 where they serve as targets
        return StepOutput(loss, {"z_std": 0.5 * (normalized_std(z1) + normalized_std(z2))})

    def param_groups(self) -> list[dict]:
        """The usual decay / no-decay groups; the predictor's groups get ``fixed_lr`` (not scheduled)."""
        wd, exclude = self.recipe.optim.weight_decay, self.recipe.optim.exclude_bias_norm
        rest = [(n, p) for n, p in self.method_parameters() if not n.startswith("predictor.")]
        pred = param_groups(self.predictor.named_parameters(prefix="predictor"), wd, exclude)
        for g in pred:
            g["fixed_lr"] = self.config.fix_pred_lr
        return param_groups(rest, wd, exclude) + pred
