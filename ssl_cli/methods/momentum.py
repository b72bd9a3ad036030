"""Momentum (EMA) encoders and shuffle-BN, shared by MoCo-style methods.

[0] MoCo, He et al. 2019, arXiv:1911.05722, Sec. 3.2 (momentum update, shuffling BN).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from pydantic import model_validator
from torch import nn

from ssl_cli.config.schema import MethodConfig, Probability
from ssl_cli.distributed import broadcast, gather, is_distributed, rank, world_size
from ssl_cli.schedules import momentum_schedule


class CosineMomentumConfig(MethodConfig):
    """The recipe keys of an EMA rate on a cosine schedule (BYOL, MoCo v3, DINO): ``momentum`` at step 0, rising to
    ``momentum_final`` at the last step. Methods with a constant rate (MoCo v1 / v2, SimCLR v2) have ``momentum``
    alone: one name for the EMA rate in every recipe."""

    momentum_final: Probability = 1.0
    """The EMA rate at the last step."""

    @model_validator(mode="after")
    def _rising(self) -> CosineMomentumConfig:
        if self.momentum_final < self.momentum:
            raise ValueError(f"momentum_final ({self.momentum_final}) must be >= momentum ({self.momentum})")
        return self


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy that receives no gradient (the key / target encoder starts equal to the online one)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


class CosineMomentum:
    """The EMA rate after optimizer step ``step`` of ``total_steps``: ``base`` rising to ``final`` on a cosine
    (BYOL's target, MoCo v3's key encoder, DINO's teacher), computed once per run length."""

    def __init__(self, base: float, final: float = 1.0) -> None:
        self.base, self.final = base, final
        self._values: torch.Tensor | None = None

    def __call__(self, step: int, total_steps: int) -> float:
        if self._values is None or self._values.numel() != total_steps:
            self._values = momentum_schedule(self.base, self.final, total_steps)
        return float(self._values[min(step, total_steps - 1)])


@torch.no_grad()
def ema_update(pairs: Sequence[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online for every ``(target, online)`` pair (a momentum
    encoder and its projector, say), in one multi-tensor update over all of them. Only trained parameters move:
    buffers keep their own statistics, and the copies of frozen parameters stay as they are."""
    t_params: list[torch.Tensor] = []
    o_params: list[torch.Tensor] = []
    for target, online in pairs:
        targets, onlines = list(target.parameters()), list(online.parameters())
        if len(targets) != len(onlines):
            raise ValueError("ema_update: target and online modules differ in structure")
        # a frozen online parameter (MoCo v3's patch projection) keeps its copy exactly, not m w + (1 - m) w
        trained = [i for i, o in enumerate(onlines) if o.requires_grad]
        t_params += [targets[i] for i in trained]
        o_params += [onlines[i].detach() for i in trained]
    if not t_params:
        return
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, o_params, alpha=1.0 - momentum)


def shuffled_forward(encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, splits: int) -> torch.Tensor:
    """Shuffle-BN: the key encoder's BatchNorm never sees a key's own query batch as its statistics.

    With BatchNorm, a key computed in the same batch as its query can "cheat" through the batch
    statistics. The reference shuffles the key batch across GPUs so each GPU's BN sees other samples.
    Under torchrun this is what happens: the global key batch is gathered, shuffled with one permutation
    (rank 0's, broadcast), each rank encodes its slice, and the keys are gathered and unshuffled. On one
    device the shuffled batch is forwarded in ``splits`` sub-batches with their own BN statistics instead; with
    W ranks each rank splits its slice into ``splits // W`` sub-batches, so there are ``splits`` BN groups in all
    whatever the number of processes. ``splits = 1`` on one process is a plain forward.

    Args:
        x: N x ... inputs (this rank's). Returns the encoder's outputs for them, in their original order.
    """
    if is_distributed():
        return _shuffled_across_ranks(encoder, x, splits)
    perm = torch.randperm(x.shape[0], device=x.device) if splits > 1 and x.shape[0] >= 2 * splits else None
    if perm is None:
        return encoder(x)
    return _in_sub_batches(encoder, x[perm], splits)[torch.argsort(perm)]


def _in_sub_batches(encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, splits: int) -> torch.Tensor:
    """``encoder`` on ``splits`` sub-batches of ``x`` (each with its own BatchNorm statistics), concatenated;
    one forward when the batch is too small to split (fewer than 2 samples per sub-batch)."""
    if splits <= 1 or x.shape[0] < 2 * splits:
        return encoder(x)
    return torch.cat([encoder(chunk) for chunk in x.chunk(splits)])


def _shuffled_across_ranks(
    encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, splits: int
) -> torch.Tensor:
    n, r, w = x.shape[0], rank(), world_size()
    everything = gather(x)  # W N x ...
    perm = broadcast(torch.randperm(everything.shape[0], device=x.device))
    mine = everything[perm[r * n : (r + 1) * n]]
    out = _in_sub_batches(encoder, mine, max(1, splits // w))
    return gather(out)[torch.argsort(perm)][r * n : (r + 1) * n]
