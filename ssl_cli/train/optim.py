"""Learning-rate scaling and the optimizers a recipe's ``[optim]`` section names (the parameter groups they take:
``ssl_cli.methods.param_groups``).

How learning rates flow through a run:

* ``effective_lr(cfg, batch_size)`` turns the recipe's base ``lr`` into the run's rate (linear or
  square-root batch-size scaling, relative to a batch of 256).
* ``build_optimizer`` stores that rate on every group as ``group["base_lr"]`` and sets the initial
  ``group["lr"] = base_lr * group["lr_scale"]``. ``lr_scale`` (default 1.0) lets a method give a part of
  the model a fixed multiple of the run's rate (e.g. a predictor at 10x).
* Every step the trainer calls ``set_lr(optimizer, schedule[step])`` with the scheduled rate (see
  ``ssl_cli.schedules``); each group then gets ``scheduled * lr_scale``, or ``base_lr * lr_scale``
  when the group has ``fixed_lr=True`` (SimSiam's predictor is trained at a constant rate).

Group keys used here besides torch's own: ``names`` (parameter names, for debugging and tests),
``lars_adapt`` (read by LARS), ``lr_scale``, ``fixed_lr`` and ``base_lr``. torch optimizers keep unknown
group keys as they are (also in ``state_dict``), so the same groups work with SGD, LARS and AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ssl_cli.config.schema import OptimConfig
from ssl_cli.train.lars import LARS

REFERENCE_BATCH_SIZE = 256


def effective_lr(cfg: OptimConfig, batch_size: int) -> float:
    """The run's learning rate: ``lr * B/256`` (linear), ``lr * sqrt(B/256)`` (sqrt) or ``lr`` (none)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    ratio = batch_size / REFERENCE_BATCH_SIZE
    if cfg.lr_scaling == "linear":
        return cfg.lr * ratio
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(ratio)
    if cfg.lr_scaling == "none":
        return cfg.lr
    raise ValueError(f"unknown lr_scaling {cfg.lr_scaling!r}")


def build_optimizer(groups: list[dict], cfg: OptimConfig, batch_size: int) -> torch.optim.Optimizer:
    """Create the optimizer ``cfg.name`` names over ``groups`` (e.g. from ``param_groups``).

    The groups are copied, not modified. Each gets ``base_lr = effective_lr(cfg, batch_size)``,
    ``lr_scale`` (default 1.0), ``fixed_lr`` (default False) and the initial ``lr = base_lr * lr_scale``
    (any ``lr`` already in a group is replaced: use ``lr_scale``). A group's own ``weight_decay`` (and, for
    LARS, ``lars_adapt``) wins over ``cfg``; ``cfg.weight_decay`` is the default for groups without one.
    SGD uses ``cfg.momentum``, LARS ``cfg.momentum`` and ``cfg.trust_coefficient``, AdamW ``cfg.betas``
    (decoupled weight decay), Adam ``cfg.betas`` (weight decay added to the gradient, L2). With every parameter on
    CUDA, SGD, AdamW and Adam run fused (one kernel per step); LARS always runs multi-tensor (``torch._foreach_*``).
    """
    base_lr = effective_lr(cfg, batch_size)
    built: list[dict] = []
    for group in groups:
        g = dict(group)
        g["params"] = list(g["params"])
        g.setdefault("lr_scale", 1.0)
        g.setdefault("fixed_lr", False)
        g["base_lr"] = base_lr
        g["base_weight_decay"] = g.get("weight_decay", cfg.weight_decay)
        g["lr"] = base_lr * g["lr_scale"]
        built.append(g)
    if not any(g["params"] for g in built):
        raise ValueError("build_optimizer: no trainable parameters")

    # on CUDA one fused kernel updates every parameter (PyTorch's own multi-tensor path, bit-for-bit the same rule)
    fused = {"fused": True} if all(p.is_cuda for g in built for p in g["params"]) else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(built, lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused)
    if cfg.name == "lars":
        return LARS(
            built,
            lr=base_lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            trust_coefficient=cfg.trust_coefficient,
            clip_lr=bool(cfg.clip_lr),
        )
    if cfg.name == "adamw":
        betas = (cfg.betas[0], cfg.betas[1])
        return torch.optim.AdamW(built, lr=base_lr, betas=betas, weight_decay=cfg.weight_decay, **fused)
    if cfg.name == "adam":
        betas = (cfg.betas[0], cfg.betas[1])
        return torch.optim.Adam(built, lr=base_lr, betas=betas, weight_decay=cfg.weight_decay, **fused)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate for this step to ``lr * lr_scale``.

    Groups with ``fixed_lr=True`` ignore ``lr`` and keep ``base_lr * lr_scale``, where ``base_lr`` is the
    run's effective rate stored by ``build_optimizer``.
    """
    for group in optimizer.param_groups:
        if group.get("fixed_lr", False):
            if "base_lr" not in group:
                raise KeyError("a fixed_lr group needs 'base_lr'; build the optimizer with build_optimizer")
            rate = group["base_lr"]
        else:
            rate = lr
        group["lr"] = float(rate) * group.get("lr_scale", 1.0)


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float, base: float) -> None:
    """Scheduled weight decay: every group's decay becomes ``base_weight_decay * weight_decay / base``.

    ``base`` is the recipe's ``optim.weight_decay``, the schedule's start: the decayed groups follow the schedule and
    the groups without decay (biases, norms) keep 0.
    """
    for group in optimizer.param_groups:
        start = group.get("base_weight_decay", group["weight_decay"])
        group["weight_decay"] = float(start) * weight_decay / base


@torch.no_grad()
def clip_gradients(params: Iterable[nn.Parameter], max_norm: float) -> None:
    """Scale each parameter's gradient down to L2 norm ``max_norm`` where it is larger (DINO's per-parameter clipping,
    unlike ``torch.nn.utils.clip_grad_norm_``, which scales all gradients by their joint norm)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    coefficients = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(coefficients.to(grads[0].dtype).unbind()))
