"""Where a run stands inside an epoch: the running sums of its steps, and when to pause for a mid-epoch checkpoint.

A mid-epoch checkpoint (``train.checkpoint_every_steps``, ``train.checkpoint_every_minutes``, or a stop signal) holds,
besides the model, optimizer and random streams, how many of the epoch's batches are done (``epoch_step``; the
sampler skips them on ``--resume``) and the epoch's running sums, so that the resumed epoch trains on exactly the
remaining batches and reports the same epoch record as an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ssl_cli.config.schema import TrainConfig
from ssl_cli.distributed import all_reduce_mean
from ssl_cli.errors import CheckpointError


@dataclass
class EpochSums:
    """Running sums of one epoch's steps, on the device (no host sync per step)."""

    loss: torch.Tensor
    steps: int = 0
    images: int = 0
    method: dict[str, torch.Tensor] = field(default_factory=dict)
    """The method's own monitors (``StepOutput.metrics``), summed over the epoch's steps."""
    resumed_steps: int = 0
    """Steps of the epoch done before this process (a mid-epoch resume): not part of this process's speed."""

    @property
    def new_steps(self) -> int:
        return self.steps - self.resumed_steps

    def means(self) -> dict[str, float]:
        return {k: float(v) / max(self.steps, 1) for k, v in self.method.items()}

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], images: int) -> None:
        self.steps += 1
        self.loss += loss.detach()
        for name, value in metrics.items():
            self.method[name] = self.method.get(name, 0.0) + value.detach().float()
        self.images += images

    def saved(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors (``sums.*``, the mean over processes) and metadata (``epoch_sums``) for a mid-epoch checkpoint."""
        tensors = {"sums.loss": all_reduce_mean(self.loss.detach().clone()).cpu()}
        tensors.update({f"sums.method.{k}": all_reduce_mean(v.clone()).cpu() for k, v in self.method.items()})
        return tensors, {"steps": self.steps, "images": self.images}

    @classmethod
    def restored(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device) -> EpochSums:
        """The sums a mid-epoch checkpoint saved (every process starts from their mean: the epoch's record, a mean
        over processes, comes out the same)."""
        method = {k[len("method.") :]: v.to(device) for k, v in tensors.items() if k.startswith("method.")}
        loss = tensors.get("loss", torch.zeros(())).to(device)
        steps = int(meta.get("steps", 0))
        return cls(loss, steps, int(meta.get("images", 0)), method, resumed_steps=steps)


def mid_epoch_position(meta: dict[str, Any], world_size: int, steps_per_epoch: int, path: Any) -> int:
    """The batches of the checkpoint's epoch already trained (0 at an epoch's end), checked against this run."""
    done = int(meta.get("epoch_step", 0) or 0)
    if done == 0:
        return 0
    saved_world = int(meta.get("world_size", 1))
    if saved_world != world_size:
        raise CheckpointError(
            f"--resume: {path} was written in the middle of an epoch by {saved_world} process(es); resume it with "
            f"{saved_world} (this run has {world_size}), or from an epoch's checkpoint"
        )
    if not 0 < done < steps_per_epoch:
        raise CheckpointError(
            f"--resume: {path} says {done} of the epoch's batches were done, but an epoch has {steps_per_epoch} "
            "here; was it trained on other data or another batch size?"
        )
    return done


class PausePolicy:
    """When the loop stops for a mid-epoch checkpoint: every ``checkpoint_every_steps`` optimizer steps, every
    ``checkpoint_every_minutes`` of training, and when a stop signal came.

    Under several processes every process must take the same decision at the same step. The step count is the same
    everywhere, but the clock and the signals are not: those two flags are agreed on (their max over the processes)
    by an all-reduce on a small gloo group of CPU tensors, started in the background after each step and read after
    the next (so no step waits for it, and a signal is acted on one step later)."""

    def __init__(self, train: TrainConfig, world_size: int) -> None:
        self.every_steps = train.checkpoint_every_steps
        self.every_seconds = train.checkpoint_every_minutes * 60.0
        self.last_save = time.monotonic()
        self.group = dist.new_group(backend="gloo") if world_size > 1 else None
        self._flags: torch.Tensor | None = None
        self._pending: Any = None
        self._saved_since = False

    def saved(self) -> None:
        self.last_save, self._saved_since = time.monotonic(), True

    def decide(self, step: int, stop_requested: bool) -> tuple[bool, bool]:
        """(write a checkpoint now, stop after it) after global step ``step``."""
        due = bool(self.every_steps) and step % self.every_steps == 0
        late = bool(self.every_seconds) and time.monotonic() - self.last_save >= self.every_seconds
        stop = stop_requested
        if self.group is not None:
            late, stop = self._agreed(late, stop)
        return due or late or stop, stop

    def _agreed(self, late: bool, stop: bool) -> tuple[bool, bool]:
        agreed = (False, False)
        if self._pending is not None:
            self._pending.wait()
            # a save since those flags were raised already answered their clock
            agreed = (bool(self._flags[0] > 0) and not self._saved_since, bool(self._flags[1] > 0))
        self._saved_since = False
        self._flags = torch.tensor([float(late), float(stop)])
        self._pending = dist.all_reduce(self._flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def stop_agreed(self, stop_requested: bool) -> bool:
        """After an epoch's end (its checkpoint written): whether any process was asked to stop."""
        self.close()
        if self.group is None:
            return stop_requested
        flag = torch.tensor([float(stop_requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag[0] > 0)

    def close(self) -> None:
        """Wait for the flags in flight (every process has started the same all-reduces)."""
        if self._pending is not None:
            self._pending.wait()
        self._pending = self._flags = None
