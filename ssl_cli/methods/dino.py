"""DINO: self-distillation with no labels, for vision transformers and ResNets.

Student: backbone -> DINO head (3-layer MLP with GELU, 256-d bottleneck, L2 normalisation, a weight-normalised
bias-free last layer with K outputs). Teacher: a momentum (EMA) copy of both, momentum 0.996 -> 1 on a cosine,
without stochastic depth. The teacher sees only the global crops; the student sees every crop (multi-crop,
same-size crops batched). Each teacher output is centred (minus a running mean of teacher outputs, momentum 0.9,
over every process's batch) and sharpened (softmax at 0.04 -> 0.07, a linear warm-up over the first epochs); each
student crop other than that same crop predicts it (softmax at 0.1). The last layer gets no update during the
first epoch. Gradient clipping (per parameter) and the weight-decay schedule (0.04 -> 0.4) are trainer options
(``optim.clip_grad``, ``optim.weight_decay_end``) that the DINO recipes set.

[0] DINO, Caron, Touvron, Misra, Jegou, Mairal, Bojanowski, Joulin 2021, arXiv:2104.14294; official code
    facebookresearch/dino (main_dino.py, vision_transformer.DINOHead).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field
from timm.layers import DropPath
from torch import nn

from ssl_cli.config.schema import PositiveInt, Probability
from ssl_cli.heads import DINOHead
from ssl_cli.losses.dino import dino_loss, teacher_probs, teacher_temperatures, updated_center
from ssl_cli.methods.base import Method, StepOutput
from ssl_cli.methods.momentum import CosineMomentum, CosineMomentumConfig, ema_update, frozen_copy
from ssl_cli.methods.multicrop import check_num_targets, encode_then_head
from ssl_cli.methods.registry import register

Temperature = Annotated[float, Field(gt=0.0)]


class DINOConfig(CosineMomentumConfig):
    name: Literal["dino"] = "dino"
    num_prototypes: PositiveInt = 65536
    """Outputs of the head's last layer (the reference's ``out_dim``)."""
    proj_hidden_dim: PositiveInt = 2048
    proj_output_dim: PositiveInt = 256
    """The bottleneck before the L2 normalisation and the last layer."""
    proj_layers: Annotated[int, Field(ge=1)] = 3
    proj_batchnorm: bool = False
    """BatchNorm in the head's hidden layers (the reference's ``use_bn_in_head``)."""
    norm_last_layer: bool = True
    """Keep the last layer's weight-norm gains at 1 (more stable; the ViT-S runs train them: false)."""
    student_temperature: Temperature = 0.1
    teacher_temperature: Temperature = 0.07
    warmup_teacher_temperature: Temperature = 0.04
    warmup_teacher_temperature_epochs: Annotated[int, Field(ge=0)] = 30
    center_momentum: Probability = 0.9
    momentum: Probability = 0.996
    """Teacher momentum at step 0; it rises to ``momentum_final`` (1) on a cosine schedule (0.9995 suits batch
    256)."""
    renamed: ClassVar[dict[str, str]] = {"momentum_base": "momentum"}
    freeze_last_layer_epochs: Annotated[float, Field(ge=0.0)] = 1.0
    num_targets: Annotated[int, Field(ge=1)] = 2
    """The first ``num_targets`` views (the global crops) go through the teacher."""


@register
class DINO(Method):
    Config = DINOConfig
    description = "DINO (2021): self-distillation, EMA teacher on global crops, centering + sharpening, multi-crop"
    num_views = 2
    multi_crop = True
    demo_overrides = {"method.num_prototypes": 1024, "method.warmup_teacher_temperature_epochs": 2}

    def __init__(self, config: DINOConfig, backbone, recipe) -> None:
        super().__init__(config, backbone, recipe)
        check_num_targets(config.num_targets, recipe.num_views, "teacher views")
        self.head = DINOHead(
            self.feature_dim,
            config.num_prototypes,
            config.proj_hidden_dim,
            config.proj_output_dim,
            config.proj_layers,
            config.proj_batchnorm,
            config.norm_last_layer,
        )
        self.teacher_backbone = _without_drop_path(frozen_copy(self.backbone))
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, config.num_prototypes))
        self.epoch = 0
        self._temperatures = teacher_temperatures(
            config.warmup_teacher_temperature,
            config.teacher_temperature,
            config.warmup_teacher_temperature_epochs,
            recipe.train.epochs,
        )
        self._momenta = CosineMomentum(config.momentum, config.momentum_final)
        self._new_center: torch.Tensor | None = None

    def teacher_temperature(self, epoch: int) -> float:
        return float(self._temperatures[min(epoch, len(self._temperatures) - 1)])

    def epoch_start(self, epoch, batches) -> None:
        self.epoch = epoch

    def epoch_resume(self, epoch: int) -> None:
        self.epoch = epoch

    def student(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Head outputs of every view: the backbone per crop size, the head once over all crops (MultiCropWrapper)."""
        return encode_then_head(self.backbone, self.head, views)

    @torch.no_grad()
    def teacher(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The teacher's head outputs of the global crops, concatenated (targets x N) x K."""
        return torch.cat(encode_then_head(self.teacher_backbone, self.teacher_head, views))

    def training_step(self, views: list[torch.Tensor], step: int, index: torch.Tensor | None = None) -> StepOutput:
        n_targets = self.config.num_targets
        teacher_out = self.teacher(views[:n_targets])  # global crops: one batch
        student_out = self.student(views)
        temperature = self.teacher_temperature(self.epoch)
        targets = teacher_probs(teacher_out, self.center, temperature).chunk(n_targets)
        loss = dino_loss(student_out, list(targets), self.config.student_temperature)
        self._new_center = updated_center(self.center, teacher_out, self.config.center_momentum)
        entropy = -(targets[0] * targets[0].clamp_min(1e-12).log()).sum(dim=1).mean()
        metrics = {"teacher_entropy": entropy.detach(), "teacher_temperature": entropy.new_tensor(temperature)}
        return StepOutput(loss, metrics)

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        if step * self.recipe.train.epochs / max(total_steps, 1) < self.config.freeze_last_layer_epochs:
            for p in self.head.last_layer.parameters():
                p.grad = None  # no update at all during the first epoch(s): no weight decay, no momentum

    def momentum(self, step: int, total_steps: int) -> float:
        return self._momenta(step, total_steps)

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        m = self.momentum(step, total_steps)
        ema_update([(self.teacher_backbone, self.backbone), (self.teacher_head, self.head)], m)
        new, self._new_center = self._new_center, None
        if new is not None:
            self.center.copy_(new)


def _without_drop_path(module: nn.Module) -> nn.Module:
    """The teacher has no stochastic depth (the reference builds it without ``drop_path_rate``)."""
    for m in module.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
    return module
