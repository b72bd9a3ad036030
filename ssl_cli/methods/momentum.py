"""Momentum (EMA) encoders and shuffle-BN, shared by MoCo-style methods.

[0] MoCo, He et al. 2019, arXiv:1911.05722, Sec. 3.2 (momentum update, shuffling BN).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy that receives no gradient (the key / target encoder starts equal to the online one)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, for parameters (buffers keep their own stats)."""
    t_params = list(target.parameters())
    o_params = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError("ema_update: target and online modules differ in structure")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, o_params, alpha=1.0 - momentum)


def shuffled_forward(encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, splits: int) -> torch.Tensor:
    """Shuffle-BN emulated on one device.

    With BatchNorm, a key computed in the same batch as its query can "cheat" through the batch
    statistics. The reference shuffles the key batch across GPUs so each GPU's BN sees other samples.
    On one device we shuffle and then forward ``splits`` sub-batches separately, so every sub-batch
    has its own BN statistics, and undo the shuffle afterwards. ``splits = 1`` is a plain forward.

    Args:
        x: N x ... inputs. Returns the encoder's outputs in the original order.
    """
    if splits <= 1 or x.shape[0] < 2 * splits:
        return encoder(x)
    perm = torch.randperm(x.shape[0], device=x.device)
    out = torch.cat([encoder(chunk) for chunk in x[perm].chunk(splits)])
    return out[torch.argsort(perm)]
