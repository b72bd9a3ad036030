"""Loading saved weights into a model, and saying in one line why they do not fit.

torch's own message (``Error(s) in loading state_dict for ResNet:`` and then one line per kind of problem, each
listing every key) is long and many lines; its first line says nothing useful and its last says only the last kind.
:func:`mismatch` compares the two sides itself and names the first few missing keys, unexpected keys and shape
mismatches, with their shapes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ssl_cli.errors import CheckpointError

SHOWN = 3
"""Keys named per kind of problem; the rest are counted."""


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(n) for n in t.shape) or "scalar"


def _name(key: str, limit: int = 60) -> str:
    return key if len(key) <= limit else "..." + key[-(limit - 3) :]


def _few(items: list[str], kind: str) -> str:
    more = f", and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    plural = kind if len(items) == 1 else kind + ("es" if kind.endswith("h") else "s")
    legend = ", file vs model" if kind == "shape mismatch" else ""
    return f"{len(items)} {plural}{legend} ({', '.join(items[:SHOWN])}{more})"


def mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """Why ``state`` does not load into ``model`` (strict): e.g. ``2 missing keys (fc.weight 10x96, fc.bias 10);
    1 shape mismatch, file vs model (conv1.weight 8x3x3x3 vs 16x3x3x3)``; empty if the keys and shapes fit."""
    own = model.state_dict()
    missing = [f"{_name(k)} {_shape(v)}" for k, v in own.items() if k not in state]
    unexpected = [f"{_name(k)} {_shape(v)}" for k, v in state.items() if k not in own]
    shapes = [
        f"{_name(k)} {_shape(state[k])} vs {_shape(v)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    parts = [
        _few(items, kind)
        for items, kind in ((missing, "missing key"), (unexpected, "unexpected key"), (shapes, "shape mismatch"))
        if items
    ]
    return "; ".join(parts)


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``model.load_state_dict(state, strict=True)``; if they do not fit, a ``CheckpointError``:
    ``WHAT: 1 missing key (...); 2 shape mismatches (...)``."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        reason = mismatch(model, state) or (lines[-1] if lines else type(e).__name__)
        raise CheckpointError(f"{what}: {reason}") from None
