"""Checkpoints: safetensors files with JSON metadata; nothing in them is pickled or executed on load.

Layout of a training checkpoint:

- tensors ``model.<name>``: the method's full ``state_dict`` (backbone under ``model.backbone.``, heads,
  momentum encoders, queues);
- tensors ``optim.<param index>.<state name>`` plus metadata ``optim_groups`` (JSON): the optimizer;
- tensor ``rng.torch`` (and ``rng.cuda.<i>``): random generator states, so a resumed run continues the
  same random stream;
- metadata: ``format``, ``ssl_version``, ``recipe`` (the resolved recipe), ``backbone`` (timm name and
  kwargs, stem changes), ``preprocessing`` (mean, std, input size), ``epoch``, ``step``, ``data``, ``metrics``.
- metadata ``tensors_sha256``: the hash of all the tensors above (``ssl_cli.artifacts.integrity``), checked by
  ``read_safetensors`` on every read, so a checkpoint whose weights changed after writing is refused.

Writes (``ssl_cli.train.checkpoint``) go through ``ssl_cli.artifacts.safetensors_io.atomic_save``: an interrupted
write never leaves a broken checkpoint behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssl_cli.artifacts.metadata import check_metadata
from ssl_cli.artifacts.safetensors_io import read_safetensors
from ssl_cli.errors import CheckpointError

FORMAT = "ssl-checkpoint/1"
EXPORT_FORMAT = "ssl-backbone/1"


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    """Metadata with JSON values decoded."""

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under ``prefix.`` with the prefix removed."""
        p = prefix + "."
        return {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}

    @property
    def recipe(self):
        from ssl_cli.config import recipe_from_dict

        return recipe_from_dict(self.meta["recipe"], source=f"{self.path} (recipe)")


def read_checkpoint(path: str | Path) -> Checkpoint:
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT:
        found = meta.get("format", "no 'format' metadata")
        raise CheckpointError(f"{path} is not an ssl training checkpoint (format: {found}; expected {FORMAT})")
    for key in ("recipe", "backbone", "preprocessing", "epoch", "step"):
        if key not in meta:
            raise CheckpointError(f"{path}: checkpoint metadata lacks '{key}'")
    check_metadata(meta, path)
    return Checkpoint(Path(path), tensors, meta)
