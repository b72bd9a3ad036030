"""MoCo v1: momentum contrast, contrastive learning as a look-up in a queue of keys.

Query encoder f_q (backbone + head, trained) and key encoder f_k (a momentum copy, no gradient);
the loss contrasts each query with its own key (positive) and a FIFO queue of K keys from earlier
batches (negatives). After each step: f_k <- m f_k + (1 - m) f_q, and the batch's keys are enqueued.
Shuffle-BN keeps BatchNorm from telling the positive apart. MoCo v1's head is one Linear layer to 128-d;
MoCo v2 (``ssl_cli.methods.mocov2``) is this method with an MLP head and other defaults.

[0] MoCo, He, Fan, Wu, Xie, Girshick 2019, arXiv:1911.05722 (Algorithm 1, Sec. 3.3: K 65536, m 0.999, tau 0.07).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ssl_cli.config.schema import PositiveInt, Probability
from ssl_cli.distributed import gather
from ssl_cli.heads import ProjectorConfig, ProjectorKind, projector
from ssl_cli.losses.moco import KeyQueue, moco_logits, positive_first_cross_entropy
from ssl_cli.methods.base import Method, StepOutput
from ssl_cli.methods.momentum import ema_update, frozen_copy, shuffled_forward
from ssl_cli.methods.registry import register


class MoCoV1Config(ProjectorConfig):
    name: Literal["mocov1"] = "mocov1"
    temperature: Annotated[float, Field(gt=0.0)] = 0.07
    queue_size: PositiveInt = 65536
    momentum: Probability = 0.999
    projector: ProjectorKind = "linear"  # MoCo v1: the ResNet's fc replaced by a 128-d Linear layer
    shuffle_bn_splits: PositiveInt = 8
    """Shuffle-BN on one device: the key batch is shuffled and forwarded in this many sub-batches."""
    symmetric: bool = False
    """Also contrast view 2's queries with view 1's keys (a common small-data variant; the paper is asymmetric)."""


@register
class MoCoV1(Method):
    Config = MoCoV1Config
    description = "MoCo v1 (2019): momentum key encoder, queue of 65536 negatives, linear 128-d head, tau 0.07"
    # the demo's 80 steps: a short queue that is refilled often, a faster key encoder, a softer temperature
    demo_overrides = {"method.queue_size": 2048, "method.momentum": 0.99, "method.temperature": 0.2}

    def __init__(self, config: MoCoV1Config, backbone, recipe) -> None:
        super().__init__(config, backbone, recipe)
        self.projector, dim = projector(config, self.feature_dim)
        self.key_backbone = frozen_copy(self.backbone)
        self.key_projector = frozen_copy(self.projector)
        self.queue = KeyQueue(config.queue_size, dim)
        self._new_keys: torch.Tensor | None = None

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)).float(), dim=1)  # N x D, fp32 from here (precision.py)

    @torch.no_grad()
    def key(self, x: torch.Tensor) -> torch.Tensor:
        def encode(chunk: torch.Tensor) -> torch.Tensor:
            return self.key_projector(self.key_backbone(chunk))

        return F.normalize(shuffled_forward(encode, x, self.config.shuffle_bn_splits).float(), dim=1)  # N x D

    def contrast(self, x_query: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and instance-discrimination accuracy (positive ranked first among 1 + K keys)."""
        logits = moco_logits(self.query(x_query), keys, self.queue.keys, self.config.temperature)
        return positive_first_cross_entropy(logits), (logits.argmax(dim=1) == 0).float().mean().detach()

    def training_step(self, views: list[torch.Tensor], step: int, index: torch.Tensor | None = None) -> StepOutput:
        x1, x2 = views
        k2 = self.key(x2)
        loss, acc = self.contrast(x1, k2)
        keys = [k2]
        if self.config.symmetric:
            k1 = self.key(x1)
            loss2, acc2 = self.contrast(x2, k1)
            loss, acc = 0.5 * (loss + loss2), 0.5 * (acc + acc2)
            keys.append(k1)
        # the queue is read by the loss graph: write the new keys only after the optimizer step
        # every rank's keys, in the order one process with the global batch would enqueue them
        self._new_keys = torch.cat([gather(k) for k in keys])
        return StepOutput(loss, {"contrastive_acc": acc})

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        ema_update([(self.key_backbone, self.backbone), (self.key_projector, self.projector)], self.config.momentum)
        if self._new_keys is not None:
            self.queue.enqueue(self._new_keys)
            self._new_keys = None
