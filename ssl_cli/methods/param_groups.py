"""Parameter groups: which parameters get weight decay (and LARS adaptation) and which do not.

A method's ``param_groups()`` builds them; the trainer's optimizers (``ssl_cli.train.optim``) take them as they are.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and every parameter with at most one dimension (norm weights and biases, scalars)."""
    return param.ndim <= 1 or name == "bias" or name.endswith(".bias")


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float, exclude_bias_norm: bool
) -> list[dict]:
    """Split parameters into a decayed group and a no-decay group (biases and parameters with ndim <= 1).

    Parameters with ``requires_grad=False`` are left out. The decayed group has ``weight_decay`` and
    ``lars_adapt=True``; the no-decay group ``weight_decay=0.0`` and ``lars_adapt=False``. Each group keeps
    its parameters' names under ``"names"``. Empty groups are dropped; with ``exclude_bias_norm=False``
    every trainable parameter lands in the one decayed group.
    """
    decay: dict = {"params": [], "names": [], "weight_decay": weight_decay, "lars_adapt": True}
    no_decay: dict = {"params": [], "names": [], "weight_decay": 0.0, "lars_adapt": False}
    seen: set[int] = set()
    for name, param in named_params:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))  # shared (tied) parameters may appear twice; torch rejects duplicates
        group = no_decay if exclude_bias_norm and _no_decay(name, param) else decay
        group["params"].append(param)
        group["names"].append(name)
    return [g for g in (decay, no_decay) if g["params"]]
