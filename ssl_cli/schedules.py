"""Per-step schedules: learning rate (warm-up + cosine, constant or step decay) and BYOL's target momentum.

Every schedule is a float64 tensor with one value per optimizer step, indexed by the global step (the
DINO ``cosine_scheduler`` layout), so resuming a run at step ``k`` simply reads ``schedule[k]``.
"""

from __future__ import annotations

import math

import torch

from ssl_cli.config.schema import OptimConfig, ScheduleConfig


def _check(total_steps: int, warmup_steps: int) -> None:
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")


def _warmup(base: float, total_steps: int, warmup_steps: int, warmup_start: float) -> torch.Tensor:
    """The first ``min(warmup_steps, total_steps)`` values of the ramp ``start + (base - start) * i / W``.

    When the warm-up is at least as long as the run it is cut off, not squeezed: the ramp keeps its slope
    and the run simply ends before reaching ``base``.
    """
    n = min(warmup_steps, total_steps)
    i = torch.arange(n, dtype=torch.float64)
    return warmup_start + (base - warmup_start) * i / max(warmup_steps, 1)


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> torch.Tensor:
    """Linear warm-up from ``warmup_start`` to ``base``, then a half-cosine from ``base`` to ``final``.

    Step ``i < W`` of the warm-up is ``warmup_start + (base - warmup_start) * i / W``; step ``i`` of the
    ``n = total_steps - W`` cosine steps is ``final + (base - final) * (1 + cos(pi * i / n)) / 2``, so the
    first is ``base`` and the last is just above ``final``. Returns ``total_steps`` float64 values.
    """
    _check(total_steps, warmup_steps)
    warm = _warmup(base, total_steps, warmup_steps, warmup_start)
    n = total_steps - warm.numel()
    i = torch.arange(n, dtype=torch.float64)
    cosine = final + 0.5 * (base - final) * (1.0 + torch.cos(math.pi * i / max(n, 1)))
    return torch.cat([warm, cosine])


def constant_schedule(base: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0) -> torch.Tensor:
    """Linear warm-up as in ``cosine_schedule``, then ``base`` for the remaining steps (float64)."""
    _check(total_steps, warmup_steps)
    warm = _warmup(base, total_steps, warmup_steps, warmup_start)
    rest = torch.full((total_steps - warm.numel(),), float(base), dtype=torch.float64)
    return torch.cat([warm, rest])


def step_schedule(
    base: float,
    total_steps: int,
    boundaries: list[int],
    gamma: float,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
    factors: list[float] | None = None,
) -> torch.Tensor:
    """Linear warm-up as in ``cosine_schedule``, then ``base * gamma ** (number of boundaries <= step)`` (float64).

    ``boundaries`` are global step indices: from step ``b`` on, the rate has been multiplied by ``gamma`` once
    more (the MoCo / InstDisc "x0.1 at epochs 120 and 160" schedule, with ``b = epoch * steps_per_epoch``).
    With ``factors`` (one per boundary) the rate from boundary i on is ``base * factors[i]`` instead.
    """
    _check(total_steps, warmup_steps)
    warm = _warmup(base, total_steps, warmup_steps, warmup_start)
    steps = torch.arange(warm.numel(), total_steps)
    drops = (steps.unsqueeze(1) >= torch.tensor(boundaries, dtype=torch.long).reshape(1, -1)).sum(dim=1)
    if factors is None:
        multiplier = torch.pow(torch.tensor(gamma, dtype=torch.float64), drops)
    else:
        multiplier = torch.tensor([1.0, *factors], dtype=torch.float64)[drops]
    return torch.cat([warm, base * multiplier])


def lr_schedule(cfg: ScheduleConfig, base_lr: float, steps_per_epoch: int, epochs: int) -> torch.Tensor:
    """The run's per-step learning rate: ``epochs * steps_per_epoch`` values for ``optim.set_lr``.

    ``base_lr`` is the effective (batch-size-scaled) rate; warm-up starts at ``cfg.warmup_start`` and lasts
    ``round(cfg.warmup_epochs * steps_per_epoch)`` steps; ``cfg.min_lr`` is the absolute final rate of
    the cosine decay; ``step`` multiplies the rate by ``cfg.gamma`` from each of ``cfg.milestones`` (epochs) on (or sets
    it to ``base_lr * cfg.factors[i]`` from milestone i on).
    """
    if steps_per_epoch < 0 or epochs < 0:
        raise ValueError(f"steps_per_epoch and epochs must be >= 0, got {steps_per_epoch}, {epochs}")
    total = steps_per_epoch * epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    start = cfg.warmup_start
    if cfg.name == "cosine":
        return cosine_schedule(base_lr, cfg.min_lr, total, warmup, start)
    if cfg.name == "constant":
        return constant_schedule(base_lr, total, warmup, start)
    if cfg.name == "step":
        boundaries = [round(m * steps_per_epoch) for m in cfg.milestones]
        return step_schedule(base_lr, total, boundaries, cfg.gamma, warmup, start, cfg.factors)
    raise ValueError(f"unknown schedule {cfg.name!r}")


def momentum_schedule(base: float, final: float, total_steps: int) -> torch.Tensor:
    """BYOL's target-network momentum: ``tau_k = final - (final - base) * (cos(pi * k / K) + 1) / 2``.

    For ``k = 0 .. K-1`` with ``K = total_steps``; with ``final = 1`` this is BYOL's
    ``1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2``: it starts at ``base`` and rises towards ``final``.
    """
    _check(total_steps, 0)
    k = torch.arange(total_steps, dtype=torch.float64)
    return final - (final - base) * (torch.cos(math.pi * k / max(total_steps, 1)) + 1.0) / 2.0


def weight_decay_schedule(cfg: OptimConfig, total_steps: int) -> torch.Tensor | None:
    """DINO's weight-decay schedule: a cosine from ``cfg.weight_decay`` to ``cfg.weight_decay_end`` over the run, no
    warm-up (one value per step); None when ``weight_decay_end`` is unset (constant decay)."""
    if cfg.weight_decay_end is None:
        return None
    return cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total_steps)
