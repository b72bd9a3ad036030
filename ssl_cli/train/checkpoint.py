"""Writing training checkpoints: the method's state, the optimizer and the random streams, with the run's metadata.

The layout and the reading side are ``ssl_cli.artifacts.checkpoint``; the write goes through the one atomic writer
(``ssl_cli.artifacts.atomic``), so an interrupted write never leaves a broken checkpoint behind. Nothing is pickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import ssl_cli
from ssl_cli.artifacts.checkpoint import FORMAT, Checkpoint
from ssl_cli.artifacts.safetensors_io import atomic_save
from ssl_cli.errors import CheckpointError


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


IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable")
"""Optimizer settings that say how its step runs on a device, not what it computes."""


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
    # how the step runs (fused on CUDA, multi-tensor, ...) follows this machine: a GPU run may continue on the CPU
    groups = [{**g, **{k: c[k] for k in IMPLEMENTATION_KEYS if k in c}} for g, c in zip(groups, current, strict=True)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _own_rng() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = state
    return out


def rng_tensors(world_size: int = 1) -> dict[str, torch.Tensor]:
    """This process's random streams as ``rng.*``; under several processes also every process's own, as
    ``rng.rank<r>.*`` (gathered, so every process must call this): a run resumed in the middle of an epoch continues
    each process's stream (shuffle-BN permutations, noise samples) where it was."""
    own = _own_rng()
    out = {f"rng.{k}": v for k, v in own.items()}
    if world_size > 1:
        states: list[dict[str, torch.Tensor] | None] = [None] * world_size
        torch.distributed.all_gather_object(states, {k: v.cpu() for k, v in own.items()})
        for r, state in enumerate(states):
            out.update({f"rng.rank{r}.{k}": v for k, v in (state or {}).items()})
    return out


def restore_rng(ckpt: Checkpoint, rank: int = 0) -> None:
    """The random streams of ``ckpt``: this process's own (``rng.rank<r>``) where saved, else the main process's."""
    rng = ckpt.section("rng")
    own = {k[len(f"rank{rank}.") :]: v for k, v in rng.items() if k.startswith(f"rank{rank}.")}
    rng = own or rng
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


OPTIMIZER_SLOTS = {"sgd": 1, "lars": 1, "adamw": 2, "adam": 2}
"""Tensors of optimizer state per trained parameter (momentum; Adam's two moments)."""


def checkpoint_bytes(model: torch.nn.Module, optimizer_name: str) -> int:
    """About the size of one training checkpoint of ``model``: its state and the optimizer's (before the optimizer
    has made its state, so that a run can check the free space before it trains)."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return state + OPTIMIZER_SLOTS.get(optimizer_name, 2) * trained


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    meta: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
    rng: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save a training checkpoint: model state, optimizer state, RNG state (``rng``: from ``rng_tensors``, by
    default this process's), ``extra`` tensors (a mid-epoch checkpoint's running sums) and metadata."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    full_meta = {"format": FORMAT, "ssl_version": ssl_cli.__version__, **meta}
    if optimizer is not None:
        opt_tensors, groups, scalars = optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
        full_meta["optim_groups"] = groups
        full_meta["optim_scalars"] = scalars
    tensors.update(rng if rng is not None else rng_tensors())
    tensors.update(extra or {})
    atomic_save(tensors, full_meta, path)
