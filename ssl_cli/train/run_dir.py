"""The run folder: ``recipe.toml``, ``metrics.jsonl`` and ``checkpoints/{last,epoch_NNNN}.safetensors``."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from ssl_cli.artifacts.atomic import DiskFull, atomic_write_text, disk_full_message, is_disk_full
from ssl_cli.config import load_recipe
from ssl_cli.config.schema import Recipe
from ssl_cli.errors import CheckpointError, RecipeError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, the folder checks still apply
    fcntl = None


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

    @property
    def recipe_file(self) -> Path:
        return self.root / "recipe.toml"

    def no_last_checkpoint(self) -> str:
        """The line for ``--resume`` without ``last.safetensors``, naming an epoch checkpoint to start from."""
        epochs = sorted(self.checkpoints.glob("epoch_*.safetensors"))
        hint = f" (it holds {epochs[-1].name}: copy it to {self.last.name} to resume from it)" if epochs else ""
        return f"--resume: no checkpoint to resume at {self.last}{hint}"

    def held(self) -> list[str]:
        """What of a run the folder holds: checkpoints (``last`` or any ``epoch_NNNN``), metrics, a recipe."""
        found = [f"checkpoints/{p.name}" for p in sorted(self.checkpoints.glob("*.safetensors"))]
        return found + [p.name for p in (self.metrics, self.recipe_file) if p.exists()]

    def _only_the_same_recipe(self, recipe: Recipe) -> bool:
        """The folder holds nothing but this very recipe: an attempt stopped before its first epoch ended."""
        if self.held() != [self.recipe_file.name]:
            return False
        try:
            return load_recipe(str(self.recipe_file)).to_dict() == recipe.to_dict()
        except RecipeError:
            return False

    def prepare(self, recipe: Recipe, resume: bool) -> None:
        """Check the folder suits a new run (or a resumed one) and write the resolved recipe. A folder that holds
        anything of a run (a checkpoint, metrics, another recipe) is never taken for a new one. Called under the
        run's ``RunLock``, which has made sure the folder exists as a folder."""
        if resume and not self.last.is_file():
            raise CheckpointError(self.no_last_checkpoint())
        held = self.held()
        if not resume and held and not self._only_the_same_recipe(recipe):
            shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
            raise CheckpointError(
                f"run folder {self.root} already holds a run ({shown}); pass --resume to continue it or choose "
                "another --out (nothing in it was changed)"
            )
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.recipe_file, tomli_w.dumps(recipe.to_dict()))

    def truncate_metrics(self, epoch: int) -> str | None:
        """On resume, drop metric lines written after the checkpoint being resumed (an interrupted epoch). A torn
        last line (a crash while it was appended) is dropped with a note, returned; a broken line before the last is
        an error, the file untouched."""
        if not self.metrics.exists():
            return None
        lines = [(n, line) for n, line in enumerate(self.metrics.read_text(encoding="utf-8").splitlines(), 1)]
        lines = [(n, line) for n, line in lines if line.strip()]
        records, note = [], None
        for i, (n, line) in enumerate(lines):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError:
                if i < len(lines) - 1:
                    raise CheckpointError(
                        f"--resume: {self.metrics} line {n} is not a JSON object; mend or remove that line"
                    ) from None
                note = f"{self.metrics}: dropped its torn last line {n} (written when the run was cut off)"
                continue
            records.append((record, line))
        keep = [line for record, line in records if record.get("epoch", 0) <= epoch]
        atomic_write_text(self.metrics, "".join(line + "\n" for line in keep))
        return note

    def remove_leftovers(self) -> str | None:
        """Temporary files of this folder's writes that a killed run left (``.last.safetensors.XXXX.tmp``, ...):
        removed at start, under the run lock (no other writer is alive); a note, or None."""
        targets = ("last.safetensors", "epoch_*.safetensors", "recipe.toml", "metrics.jsonl")
        found = [p for folder in (self.root, self.checkpoints) for t in targets for p in folder.glob(f".{t}.*.tmp")]
        if not found:
            return None
        size = sum(p.stat().st_size for p in found)
        for p in found:
            p.unlink(missing_ok=True)
        return f"removed {len(found)} temporary file(s) an interrupted write left ({size / 2**20:.1f} MiB)"

    def log_metrics(self, record: dict[str, Any]) -> None:
        try:
            with self.metrics.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a torn line is dropped with a note on --resume
            if is_disk_full(e):
                raise DiskFull(disk_full_message(self.metrics), self.metrics) from None
            raise

    def check_free_space(self, checkpoint_bytes: int, epoch_checkpoints: int) -> str | None:
        """Refuse a run whose checkpoint cannot be written here: a write needs room for the new file while the
        previous one is kept (2 x its size). A warning (returned) when the epoch checkpoints the run will keep
        need more than is free."""
        free = shutil.disk_usage(self.root).free
        mib = checkpoint_bytes / 2**20
        if free < 2 * checkpoint_bytes:
            raise DiskFull(
                f"not enough free space in {self.root} for this run's checkpoints: each is about {mib:.0f} MiB and a "
                f"write needs room for two ({free / 2**20:.0f} MiB free); free some space or choose another --out"
            )
        need = (2 + epoch_checkpoints) * checkpoint_bytes
        if free < need:
            return (
                f"warning: this run keeps {epoch_checkpoints} epoch checkpoint(s) of about {mib:.0f} MiB in "
                f"{self.checkpoints}, more than the {free / 2**20:.0f} MiB free; raise train.checkpoint_every or "
                "free some space"
            )
        return None


class RunLock:
    """One ``ssl pretrain`` at a time in a run folder: an exclusive OS lock on the folder itself for the whole run
    (``flock`` on the directory, so no file is added to it). The OS drops the lock when the process ends, however
    it ends (``kill -9`` included), so a crashed run never blocks the folder. A folder this lock created and
    nothing wrote to is removed again on exit."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> RunLock:
        if self.root.exists() and not self.root.is_dir():
            raise CheckpointError(f"--out {self.root} exists and is not a folder")
        self.created = not self.root.exists()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.root, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"--out {self.root}: cannot create the run folder ({e.strerror})") from None
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                raise CheckpointError(
                    f"--out {self.root} is in use by another ssl pretrain running now; wait for it to end or choose "
                    "another --out"
                ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.created and not any(self.root.iterdir()):
                self.root.rmdir()  # a run that stopped before writing anything leaves no empty folder
        except OSError:
            pass  # another process wrote to it meanwhile: leave it
        finally:
            os.close(self.fd)  # releases the lock


def default_run_dir(name: str, base: Path = Path("runs")) -> Path:
    """``runs/<name>``, or ``runs/<name>-2``, ``-3``... if taken: a new run never lands in an old folder."""
    candidate = base / name
    n = 2
    while candidate.exists():
        candidate = base / f"{name}-{n}"
        n += 1
    return candidate
