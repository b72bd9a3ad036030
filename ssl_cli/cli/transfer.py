"""``ssl transfer``: end-to-end fine-tuning (not implemented yet)."""

from __future__ import annotations

import typer

from ssl_cli.cli.console import fail


def transfer(
    checkpoint: str = typer.Argument(None, help="Checkpoint to fine-tune."),
) -> None:
    """Fine-tune a pretrained backbone on a labeled dataset (not available yet)."""
    raise fail("transfer is not available yet; use 'ssl linear-probe' or 'ssl knn' to evaluate a checkpoint", 2)
