"""Checking an export: the written file, run with the runtime it is meant for, against the PyTorch model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ssl_cli.errors import CheckpointError

CHECK_BATCH = 3
TOLERANCE = 1e-4
"""Largest accepted max |difference|, relative to the features' scale (see ``MAX_SCALE``)."""
MAX_SCALE = 1e3
"""The scale is max |PyTorch feature| clipped to [1, MAX_SCALE]: float32 error grows with the features, but not
without bound. Features beyond it (a trained backbone's stay far below) come from corrupted or diverged weights,
and a tolerance grown with them would let any export through."""


def check_batch(input_size: list[int], batch: int = CHECK_BATCH) -> torch.Tensor:
    """The fixed random batch every export is checked on (seeded; normalised images are ~N(0, 1) too)."""
    return torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(0))


def _non_finite(reference: torch.Tensor, got: torch.Tensor, what: str, batch: int) -> str | None:
    """The one line for features holding nan or inf (PyTorch's or the written file's), else None."""
    if not torch.isfinite(reference).all():
        return (
            f"the PyTorch model itself gives non-finite features (nan or inf) on the check batch of {batch}, so "
            "nothing can be checked: its weights hold non-finite or corrupted values; export an earlier checkpoint"
        )
    if not torch.isfinite(got).all():
        return f"the written file gives non-finite features (nan or inf) with {what} where PyTorch's are finite"
    return None


def _run(run: Callable[[torch.Tensor], Any], batch: torch.Tensor, what: str) -> torch.Tensor:
    try:
        with torch.no_grad():
            return torch.as_tensor(run(batch)).float()
    except Exception as e:  # noqa: BLE001 - any failure of the runtime is the export's failure
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"the written file could not be run with {what}: {type(e).__name__}: {first}") from None


def compare(model: torch.nn.Module, run: Callable[[torch.Tensor], Any], input_size: list[int], what: str) -> dict:
    """Max |difference| between ``run`` and ``model`` on the check batch and on its first image alone; it must be
    at most ``TOLERANCE * scale`` (see ``MAX_SCALE``), and neither may give a non-finite feature."""
    x = check_batch(input_size)
    diff, peak = 0.0, 0.0
    for batch in (x, x[:1]):
        with torch.no_grad():
            reference = model(batch).float()
        got = _run(run, batch, what)
        if got.shape != reference.shape:
            raise CheckpointError(
                f"the written file gives features of shape {list(got.shape)} with {what}, "
                f"the PyTorch model {list(reference.shape)} (batch of {len(batch)})"
            )
        if line := _non_finite(reference, got, what, len(batch)):
            raise CheckpointError(line)
        diff = max(diff, float((got - reference).abs().max()) if reference.numel() else 0.0)
        peak = max(peak, float(reference.abs().max()) if reference.numel() else 0.0)
    tolerance = TOLERANCE * min(max(1.0, peak), MAX_SCALE)
    if not diff <= tolerance:
        beyond = (
            f"; the PyTorch features reach {peak:.3g}, beyond any sane backbone's (corrupted weights?)"
            if peak > MAX_SCALE
            else ""
        )
        raise CheckpointError(
            f"the written file does not reproduce the PyTorch model with {what}: max abs difference {diff:.3g} "
            f"> tolerance {tolerance:.3g}{beyond}"
        )
    return {"max_abs_diff": diff, "tolerance": tolerance, "verified_with": what}
