"""MoCo v3: momentum contrast without a queue, for ResNets and vision transformers.

Query encoder: backbone -> projector -> predictor; key encoder: a momentum copy of backbone + projector (no
predictor). Each view's queries are contrasted with the *other* view's keys from the same batch (in-batch
negatives, gathered over all processes), symmetrised: ctr(q1, k2) + ctr(q2, k1), each scaled by 2 tau. The
momentum rises from 0.99 to 1 on a cosine schedule. Heads as the reference: projector 2 layers (ResNet) or 3
(ViT) with hidden width 4096 and output 256, ending in BatchNorm without affine parameters; predictor 2 layers
(256 -> 4096 -> 256), ending in that BatchNorm too for a ViT (``pred_last_batchnorm``: moco-v3's
``_build_mlp(..., last_bn=True)`` in MoCo_ViT, ``False`` in MoCo_ResNet); no biases anywhere. With a ViT the
random patch projection stays frozen (``backbone.freeze_patch_embed``), the paper's fix for its training
instability; ``mocov3-vit`` also builds the official ViT (12 heads, fixed sin-cos position embedding, xavier init).

[0] MoCo v3, Chen, Xie, He 2021, arXiv:2104.02057; official code facebookresearch/moco-v3.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field

from ssl_cli.config.schema import PositiveInt, Probability
from ssl_cli.heads import LastNorm, ProjectorConfig, mlp, projector
from ssl_cli.losses.mocov3 import mocov3_contrastive
from ssl_cli.methods.base import Method, StepOutput
from ssl_cli.methods.momentum import CosineMomentum, CosineMomentumConfig, ema_update, frozen_copy
from ssl_cli.methods.registry import register


class MoCoV3Config(ProjectorConfig, CosineMomentumConfig):
    name: Literal["mocov3"] = "mocov3"
    proj_hidden_dim: PositiveInt = 4096
    proj_output_dim: PositiveInt = 256
    proj_layers: Annotated[int, Field(ge=2)] = 2
    proj_last_batchnorm: LastNorm = "plain"
    pred_hidden_dim: PositiveInt = 4096
    pred_last_batchnorm: bool = False
    """The predictor ends in BatchNorm without affine parameters: the official ViT predictor does, the ResNet one
    does not."""
    temperature: Annotated[float, Field(gt=0.0)] = 1.0
    """1.0 for ResNets, 0.2 for ViTs (the reference's defaults)."""
    momentum: Probability = 0.99
    """Key-encoder momentum at step 0; it rises to ``momentum_final`` (1) on a cosine schedule."""
    renamed: ClassVar[dict[str, str]] = {"momentum_base": "momentum"}


@register
class MoCoV3(Method):
    Config = MoCoV3Config
    description = "MoCo v3 (2021): momentum encoder, in-batch keys, predictor, symmetric loss x 2 tau; ResNet or ViT"
    demo_overrides = {"method.proj_hidden_dim": 1024, "method.pred_hidden_dim": 1024}

    def __init__(self, config: MoCoV3Config, backbone, recipe) -> None:
        super().__init__(config, backbone, recipe)
        self.projector, dim = projector(config, self.feature_dim)
        dims, last_bn = [dim, config.pred_hidden_dim, dim], config.pred_last_batchnorm
        self.predictor = mlp(dims, last_bias=False, last_batchnorm=last_bn, last_affine=False)
        self.key_backbone = frozen_copy(self.backbone)
        self.key_projector = frozen_copy(self.projector)
        self._momenta = CosineMomentum(config.momentum, config.momentum_final)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(x)))

    @torch.no_grad()
    def key(self, x: torch.Tensor) -> torch.Tensor:
        return self.key_projector(self.key_backbone(x))

    def training_step(self, views: list[torch.Tensor], step: int, index: torch.Tensor | None = None) -> StepOutput:
        x1, x2 = views
        q1, q2 = self.query(x1), self.query(x2)
        k1, k2 = self.key(x1), self.key(x2)
        tau = self.config.temperature
        loss = mocov3_contrastive(q1, k2, tau) + mocov3_contrastive(q2, k1, tau)
        return StepOutput(loss)

    def momentum(self, step: int, total_steps: int) -> float:
        return self._momenta(step, total_steps)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        m = self.momentum(step, total_steps)
        ema_update([(self.key_backbone, self.backbone), (self.key_projector, self.projector)], m)
