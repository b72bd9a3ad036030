"""Checking an export: the written file, run with the runtime it is meant for, against the PyTorch model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ssl_cli.errors import CheckpointError

CHECK_BATCH = 3
TOLERANCE = 1e-4
"""Largest accepted |difference| relative to the features' scale: max(1, max |PyTorch feature|)."""


def check_batch(input_size: list[int], batch: int = CHECK_BATCH) -> torch.Tensor:
    """The fixed random batch every export is checked on (seeded; normalised images are ~N(0, 1) too)."""
    return torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(0))


def compare(model: torch.nn.Module, run: Callable[[torch.Tensor], Any], input_size: list[int], what: str) -> dict:
    """Max |difference| between ``run`` and ``model`` on the check batch and on its first image alone."""
    x = check_batch(input_size)
    diff, scale = 0.0, 1.0
    for batch in (x, x[:1]):
        with torch.no_grad():
            reference = model(batch).float()
        try:
            with torch.no_grad():
                got = torch.as_tensor(run(batch)).float()
        except Exception as e:  # noqa: BLE001 - any failure of the runtime is the export's failure
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(
                f"the written file could not be run with {what}: {type(e).__name__}: {first}"
            ) from None
        if got.shape != reference.shape:
            raise CheckpointError(
                f"the written file gives features of shape {list(got.shape)} with {what}, "
                f"the PyTorch model {list(reference.shape)} (batch of {len(batch)})"
            )
        diff = max(diff, float((got - reference).abs().max()))
        scale = max(scale, float(reference.abs().max()))
        if not torch.isfinite(got).all():
            diff = float("inf")
    tolerance = TOLERANCE * scale
    if not diff <= tolerance:
        raise CheckpointError(
            f"the written file does not reproduce the PyTorch model with {what}: max abs difference {diff:.3g} "
            f"> tolerance {tolerance:.3g}"
        )
    return {"max_abs_diff": diff, "tolerance": tolerance, "verified_with": what}
