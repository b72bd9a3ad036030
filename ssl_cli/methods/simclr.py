"""SimCLR: a simple framework for contrastive learning of visual representations.

Two strongly augmented views of each image, one shared encoder, a projector, and the NT-Xent loss over
the 2N views of the batch (each view's positive is its twin; the 2(N-1) others are negatives).

[0] SimCLR, Chen, Kornblith, Norouzi, Hinton 2020, arXiv:2002.05709.
[1] Official code google-research/simclr (tf2/model.py, ProjectionHead): hidden layers Linear - BN - ReLU, the
    last layer ``LinearLayer(use_bias=False, use_bn=True)``, i.e. a dense layer without bias and a batch norm with
    ``center=False``; SimCLR v1 and v2 share it.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from ssl_cli.heads import LastNorm, ProjectorConfig, projector
from ssl_cli.losses.ntxent import NTXentLoss
from ssl_cli.methods.base import Method, StepOutput
from ssl_cli.methods.registry import register


class SimCLRConfig(ProjectorConfig):
    name: Literal["simclr"] = "simclr"
    proj_last_batchnorm: LastNorm = "scale"
    """The official head's last layer: a bias-free linear layer, then BatchNorm with a scale and no shift [1]."""
    temperature: Annotated[float, Field(gt=0.0)] = 0.1


@register
class SimCLR(Method):
    Config = SimCLRConfig
    description = "SimCLR (2020): in-batch contrastive, NT-Xent over 2N views, MLP projector, LARS"
    # batch 256 on the demo: a softer temperature and a higher rate learn within its 80 steps
    demo_overrides = {"method.temperature": 0.2, "optim.lr": 1.0}

    def __init__(self, config: SimCLRConfig, backbone, recipe) -> None:
        super().__init__(config, backbone, recipe)
        self.projector, self.proj_dim = projector(config, self.feature_dim)
        self.loss = NTXentLoss(config.temperature)

    def projections(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """z1, z2 (N x D each, not normalised) of the two views."""
        x1, x2 = views
        # one forward for both views: BatchNorm statistics are shared over all 2N views, as in SimCLR
        z1, z2 = self.projector(self.backbone(torch.cat([x1, x2]))).chunk(2)
        return z1, z2

    def training_step(self, views: list[torch.Tensor], step: int, index: torch.Tensor | None = None) -> StepOutput:
        return StepOutput(self.loss(*self.projections(views)))
