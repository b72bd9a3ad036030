"""MoCo v2: MoCo v1 with an MLP projector, tau 0.2 and SimCLR-style augmentation (blur, cosine schedule).

The momentum key encoder, the queue, shuffle-BN and the loss are MoCo v1's (``ssl_cli.methods.mocov1``);
only the defaults differ: a Linear-ReLU-Linear head (2048 -> 128, no BatchNorm) and tau 0.2. The
augmentation and the cosine schedule live in the recipe.

[0] MoCo, He, Fan, Wu, Xie, Girshick 2019, arXiv:1911.05722.
[1] MoCo v2, Chen, Fan, Girshick, He 2020, arXiv:2003.04297.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ssl_cli.heads import ProjectorKind
from ssl_cli.methods.mocov1 import MoCoV1, MoCoV1Config
from ssl_cli.methods.registry import register


class MoCoV2Config(MoCoV1Config):
    name: Literal["mocov2"] = "mocov2"  # type: ignore[assignment]
    temperature: Annotated[float, Field(gt=0.0)] = 0.2
    projector: ProjectorKind = "mlp"
    proj_batchnorm: bool = False  # the MoCo v2 head is Linear-ReLU-Linear


@register
class MoCoV2(MoCoV1):
    Config = MoCoV2Config
    description = "MoCo v2 (2020): momentum key encoder, queue of 65536 negatives, MLP projector, tau 0.2"
    demo_overrides = {"method.queue_size": 2048, "method.momentum": 0.99}
