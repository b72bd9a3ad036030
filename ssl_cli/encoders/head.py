"""The end of timm's model interface shared by ssl's own encoders (AMDIM's, CMC's): a global pool, dropout and a
linear classifier (none with ``num_classes=0``), with ``get_classifier`` / ``reset_classifier`` / ``forward_head``
as timm's models have them, so timm's factory, its ``pretrained`` loading and ``ssl transfer`` treat the encoders as
any timm model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from torch import nn


class PooledHead(nn.Module):
    """Base of an encoder whose ``forward_features`` gives N x ``num_features`` x H x W maps."""

    def init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        self.num_features = self.head_hidden_size = num_features
        self.drop_rate = drop_rate
        self.reset_classifier(num_classes, global_pool)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.head(x)
