"""InvaSpread: unsupervised embedding learning via invariant and spreading instance features.

End-to-end instance discrimination without a memory bank: a batch of N images and N augmented copies
goes through one encoder (backbone -> linear 128-d embedding -> L2 norm). Each sample's positive is its
copy; the other 2(N - 1) samples of the batch are its negatives. The softmax embedding loss asks every
sample to be recognised as its own instance by its copy (invariance) and by no other sample (spreading).

The official code feeds two augmented copies of each image (the same random transform applied twice), not
the original image and one copy; the recipes do the same.

[0] InvaSpread, Ye, Zhang, Yuen, Chang 2019, arXiv:1904.03436; official code mangye16/Unsupervised_Embedding_Learning.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from ssl_cli.heads import ProjectorConfig, ProjectorKind, projector
from ssl_cli.losses.invaspread import invaspread_loss
from ssl_cli.methods.base import Method, StepOutput
from ssl_cli.methods.registry import register
from ssl_cli.precision import full_precision


class InvaSpreadConfig(ProjectorConfig):
    name: Literal["invaspread"] = "invaspread"
    projector: ProjectorKind = "linear"  # backbone -> fc 128 -> L2 norm, no MLP
    temperature: Annotated[float, Field(gt=0.0)] = 0.1
    detach_keys: bool = True
    """Gradient only through each similarity's anchor side, as the official code (``feat.data``); False: through
    both sides, the paper's equations read literally."""


@register
class InvaSpread(Method):
    Config = InvaSpreadConfig
    description = "InvaSpread (2019): in-batch softmax embedding, 2(N-1) negatives, linear 128-d head, tau 0.1"
    demo_overrides = {"optim.lr": 0.1}

    def __init__(self, config: InvaSpreadConfig, backbone, recipe) -> None:
        super().__init__(config, backbone, recipe)
        self.projector, _ = projector(config, self.feature_dim)

    def training_step(self, views: list[torch.Tensor], step: int, index: torch.Tensor | None = None) -> StepOutput:
        x1, x2 = views
        # one forward for both halves, as the reference (torch.cat((inputs1, inputs2)))
        z1, z2 = self.projector(self.backbone(torch.cat([x1, x2]))).chunk(2)  # N x D each
        loss = invaspread_loss(z1, z2, self.config.temperature, self.config.detach_keys)
        with torch.no_grad(), full_precision(z1):  # monitor: the copy is each sample's nearest neighbour of 2N - 1
            z = torch.nn.functional.normalize(torch.cat([z1, z2]).float(), dim=1)
            sim = (z @ z.T).fill_diagonal_(float("-inf"))
            n = z1.shape[0]
            twin = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
            acc = (sim.argmax(dim=1) == twin).float().mean()
        return StepOutput(loss, {"contrastive_acc": acc})
