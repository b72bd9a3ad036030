"""SimCLR v2: SimCLR with a deeper projection head and an optional MoCo-style memory of negatives.

Changes to SimCLR [0] in the pretraining stage of [1] (Sec. 2):

- a 3-layer projection head with BatchNorm: Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN (the hidden linear
  layers feed a BatchNorm, so they have no bias; the output is batch-normalised too, without ReLU), hidden
  width = the encoder's width (2048 for ResNet-50), 128-d output; the last BatchNorm has a scale and no shift
  (the official ``center=False``, ``proj_last_batchnorm = "scale"``); downstream use fine-tunes from the head's
  first layer (``ssl export --projector-layers 1``);
- the memory mechanism of MoCo [2]: a momentum (EMA) copy of encoder + head encodes both views, and its
  outputs are buffered in a FIFO queue whose keys join the in-batch negatives of NT-Xent (every anchor's
  denominator gets + sum_j exp(s(z_i, key_j) / tau)). The positive stays the other view from the online
  network, as in SimCLR. Keys of the current batch enter the queue only after the optimizer step, so an
  image's own key is never its negative in the same step. Paper: buffer 64K, EMA decay 0.999, "+~1%".
  ``queue_size = 0`` turns it off (plain SimCLR loss on the v2 head).

The bigger encoders (ResNet-152 3x + selective kernels) and the fine-tuning / distillation stages of [1] are
outside this pretraining method.

[0] SimCLR, Chen, Kornblith, Norouzi, Hinton 2020, arXiv:2002.05709.
[1] SimCLR v2, Chen, Kornblith, Swersky, Norouzi, Hinton 2020, arXiv:2006.10029.
[2] MoCo, He et al. 2019, arXiv:1911.05722.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ssl_cli.config.schema import Probability
from ssl_cli.distributed import gather
from ssl_cli.losses.moco import KeyQueue
from ssl_cli.methods.base import StepOutput
from ssl_cli.methods.momentum import ema_update, frozen_copy
from ssl_cli.methods.registry import register
from ssl_cli.methods.simclr import SimCLR, SimCLRConfig


class SimCLRv2Config(SimCLRConfig):
    name: Literal["simclrv2"] = "simclrv2"  # type: ignore[assignment]
    proj_layers: Annotated[int, Field(ge=2)] = 3
    queue_size: Annotated[int, Field(ge=0)] = 0
    """Momentum-encoder keys buffered as extra negatives (the paper: 65536); 0 turns the memory off."""
    momentum: Probability = 0.999
    """EMA decay of the memory network (encoder + projector), used only with ``queue_size > 0``."""


@register
class SimCLRv2(SimCLR):
    Config = SimCLRv2Config
    description = "SimCLR v2 (2020): NT-Xent, 3-layer BN projector, momentum-encoder queue of 64K negatives, LARS"
    # the demo's 2,560 images: a queue of 1,024 keys (two steps of 2N = 512) refreshed by a faster EMA, so it
    # never holds an image's key from the previous epoch; SimCLR's demo temperature and rate
    demo_overrides = {
        "method.queue_size": 1024,
        "method.momentum": 0.99,
        "method.temperature": 0.2,
        "optim.lr": 1.0,
    }

    def __init__(self, config: SimCLRv2Config, backbone, recipe) -> None:
        super().__init__(config, backbone, recipe)
        self._new_keys: torch.Tensor | None = None
        if config.queue_size > 0:
            self.key_backbone = frozen_copy(self.backbone)
            self.key_projector = frozen_copy(self.projector)
            self.queue = KeyQueue(config.queue_size, self.proj_dim)

    @property
    def uses_queue(self) -> bool:
        return self.config.queue_size > 0

    @torch.no_grad()
    def keys(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The memory network's normalised projections of both views (2N x D), no gradient."""
        return F.normalize(self.key_projector(self.key_backbone(torch.cat(views))), dim=1)

    def training_step(self, views: list[torch.Tensor], step: int, index: torch.Tensor | None = None) -> StepOutput:
        z1, z2 = self.projections(views)
        if not self.uses_queue:
            return StepOutput(self.loss(z1, z2))
        # the queue is read by the loss graph: this batch's keys are written after the optimizer step
        # every rank's keys (the same queue everywhere), view by view as one process with the global batch
        self._new_keys = torch.cat([gather(k) for k in self.keys(views).chunk(len(views))])
        return StepOutput(self.loss(z1, z2, self.queue.keys))

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        if not self.uses_queue:
            return
        ema_update([(self.key_backbone, self.backbone), (self.key_projector, self.projector)], self.config.momentum)
        if self._new_keys is not None:
            self.queue.enqueue(self._new_keys)
            self._new_keys = None
