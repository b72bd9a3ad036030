"""The run folder: ``recipe.toml``, ``metrics.jsonl`` and ``checkpoints/{last,epoch_NNNN}.safetensors``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from ssl_cli.artifacts.atomic import atomic_write_text
from ssl_cli.config.schema import Recipe
from ssl_cli.errors import CheckpointError


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.safetensors"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:04d}.safetensors"

    def prepare(self, recipe: Recipe, resume: bool) -> None:
        """Check the folder suits a new run (or a resumed one) and write the resolved recipe."""
        if self.root.exists() and not self.root.is_dir():
            raise CheckpointError(f"--out {self.root} exists and is not a folder")
        if resume and not self.last.is_file():
            raise CheckpointError(f"--resume: no checkpoint to resume at {self.last}")
        if not resume and self.last.exists():
            raise CheckpointError(
                f"run folder {self.root} already holds checkpoints; pass --resume to continue it "
                "or choose another --out"
            )
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        if not resume:
            # a new run starts its own metrics: drop lines of an earlier attempt that never wrote a checkpoint
            self.metrics.unlink(missing_ok=True)
        atomic_write_text(self.root / "recipe.toml", tomli_w.dumps(recipe.to_dict()))

    def truncate_metrics(self, epoch: int) -> None:
        """On resume, drop metric lines written after the checkpoint being resumed (an interrupted epoch)."""
        if not self.metrics.exists():
            return
        keep = [
            line
            for line in self.metrics.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("epoch", 0) <= epoch
        ]
        atomic_write_text(self.metrics, "".join(line + "\n" for line in keep))

    def log_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def default_run_dir(name: str, base: Path = Path("runs")) -> Path:
    """``runs/<name>``, or ``runs/<name>-2``, ``-3``... if taken: a new run never lands in an old folder."""
    candidate = base / name
    n = 2
    while candidate.exists():
        candidate = base / f"{name}-{n}"
        n += 1
    return candidate
