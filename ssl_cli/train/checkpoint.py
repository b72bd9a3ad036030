"""Checkpoints: safetensors files with JSON metadata; nothing in them is pickled or executed on load.

Layout of a training checkpoint:

- tensors ``model.<name>``: the method's full ``state_dict`` (backbone under ``model.backbone.``, heads,
  momentum encoders, queues);
- tensors ``optim.<param index>.<state name>`` plus metadata ``optim_groups`` (JSON): the optimizer;
- tensor ``rng.torch`` (and ``rng.cuda.<i>``): random generator states, so a resumed run continues the
  same random stream;
- metadata: ``format``, ``ssl_version``, ``recipe`` (the resolved recipe), ``backbone`` (timm name and
  kwargs, stem changes), ``preprocessing`` (mean, std, input size), ``epoch``, ``step``, ``data``, ``metrics``.

Writes go to a temporary file that replaces the target in one ``os.replace``: an interrupted write never
leaves a broken checkpoint behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import ssl_cli
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


def atomic_save(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> None:
    """Write a safetensors file atomically; metadata values that are not strings are stored as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    # safetensors refuses shared or strided storage: give it compact CPU copies
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(data, tmp, metadata=flat)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors and metadata (JSON values decoded) of any safetensors file, with one-line errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta


def read_checkpoint(path: str | Path) -> Checkpoint:
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT:
        found = meta.get("format", "no 'format' metadata")
        raise CheckpointError(f"{path} is not an ssl training checkpoint (format: {found}; expected {FORMAT})")
    for key in ("recipe", "backbone", "preprocessing", "epoch", "step"):
        if key not in meta:
            raise CheckpointError(f"{path}: checkpoint metadata lacks '{key}'")
    return Checkpoint(Path(path), tensors, meta)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict], dict]:
    """Split ``optimizer.state_dict()`` into tensors, JSON-able group settings and JSON-able scalars."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups, scalars


def load_optimizer(optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in ckpt.section("optim").items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in ckpt.meta.get("optim_scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = ckpt.meta.get("optim_groups", [])
    current = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in current]:
        raise CheckpointError(f"{ckpt.path}: optimizer state does not match this model's parameters")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def restore_rng(ckpt: Checkpoint) -> None:
    rng = ckpt.section("rng")
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    meta: dict[str, Any],
) -> None:
    """Save a training checkpoint: model state, optimizer state, RNG state and metadata."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    full_meta = {"format": FORMAT, "ssl_version": ssl_cli.__version__, **meta}
    if optimizer is not None:
        opt_tensors, groups, scalars = optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
        full_meta["optim_groups"] = groups
        full_meta["optim_scalars"] = scalars
    tensors.update(rng_tensors())
    atomic_save(tensors, full_meta, path)
