"""``ssl bench``: how close a recipe's training step comes to its backbone's own speed on this machine.

Three measurements on the recipe's device, each after a few untimed warm-up iterations:

- **ceiling**: the backbone alone, forward + backward (sum of its features as the loss) on random tensors of
  every view's shape (views of one size batched together, as the methods run them), plus the forwards the
  method's momentum encoders make in a step (MoCo's keys, BYOL's targets; their input shapes are recorded from
  a real step). No pretraining step can be faster: it runs this plus heads, loss and optimizer.
  ``backbone_images_per_second`` is the backbone's forward + backward alone.
- **data**: the data path alone, from dataset indices to augmented views on the device (loader workers for
  ``data.augment = "sample"``, whole-batch augmentation for ``"batch"``).
- **step**: full training steps as ``ssl pretrain`` runs them (data, method step, backward, optimizer, momentum
  and queue updates).

Throughputs are images per second (one image = all of its views). ``step / ceiling`` is the share of the
backbone's speed a pretraining run keeps; the data path must be well above the ceiling not to limit it.
Peak memory: CUDA's peak allocation on a GPU, the process's peak resident set on the CPU.
"""

from __future__ import annotations

import itertools
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ssl_cli.config.schema import Recipe
from ssl_cli.data import open_dataset
from ssl_cli.data.batches import choose_augment
from ssl_cli.distributed import DistEnv
from ssl_cli.methods.multicrop import encode_by_size
from ssl_cli.train.optim import build_optimizer, effective_lr, set_lr
from ssl_cli.train.pretrain import autocast, build_method, optimizer_step, resolve_device, training_batches


def _timed(run: Callable[[], Any], iterations: int, warmup: int, device: torch.device) -> float:
    """Seconds per iteration of ``run`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        run()
    _sync(device)
    return (time.perf_counter() - start) / iterations


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return kb / (2**20 if sys.platform == "darwin" else 2**10)


def _endless(make: Callable[[], Iterator]) -> Callable[[], Any]:
    """A function returning the next item of ``make()``, restarting it when exhausted."""
    state = {"it": make()}

    def step() -> Any:
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = make()
            return next(state["it"])

    return step


def bench(recipe: Recipe, data: str | None = None, steps: int = 20, warmup: int = 3) -> dict[str, Any]:
    """Ceiling, data-path and step throughput of ``recipe`` (images/s), their ratios and peak memory."""
    device = resolve_device(recipe.train.device)
    train = recipe.train
    batch = train.batch_size
    torch.manual_seed(train.seed)
    method = build_method(recipe).to(device)
    memory_format = torch.channels_last if train.channels_last else torch.contiguous_format
    if train.channels_last:
        method = method.to(memory_format=memory_format)
    method.train()

    images = open_dataset(data, role="train").cached(recipe.data.cache)
    choice = choose_augment(recipe.data.augment, images)
    loader = training_batches(recipe, images, device, DistEnv(0, 1, 0, device), choice.path)
    next_batch = _endless(lambda: iter(loader))

    def data_step() -> tuple[list[torch.Tensor], torch.Tensor]:
        views, _labels, index = next_batch()
        return [v.to(device, non_blocking=True, memory_format=memory_format) for v in views], index.to(device)

    optimizer = build_optimizer(method.param_groups(), recipe.optim, batch)
    set_lr(optimizer, effective_lr(recipe.optim, batch))
    method.bind_data(len(images), None)

    def first_batches() -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        for views, _labels, index in itertools.islice(loader, 1 + 2 * (steps + warmup)):
            yield [v.to(device, non_blocking=True, memory_format=memory_format) for v in views], index.to(device)

    # untimed, the hook before an epoch (DeepCluster v2 fills its feature memory and runs k-means), over the batches
    # this benchmark draws (a pass's first ones, as ``next_batch`` restarts there) rather than a whole epoch
    method.epoch_start(0, first_batches)
    counter = {"step": 0}

    def train_step() -> None:
        views, index = data_step()
        total = steps + warmup + 1
        optimizer_step(
            method, method, optimizer, views, index, counter["step"], total, train.precision, recipe.optim.clip_grad
        )
        counter["step"] += 1

    # one real step records what the momentum encoders (frozen copies of the backbone) are fed
    momentum = [m for m in method.children() if m is not method.backbone and type(m) is type(method.backbone)]
    fed: list[tuple[nn.Module, torch.Size]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: fed.append((mod, args[0].shape))) for m in momentum]
    train_step()
    for hook in hooks:
        hook.remove()

    shapes = [(batch, 3, v.size, v.size) for v in recipe.views for _ in range(v.count)]
    inputs = [torch.randn(s, device=device).contiguous(memory_format=memory_format) for s in shapes]
    key_inputs = [(m, torch.randn(s, device=device).contiguous(memory_format=memory_format)) for m, s in fed]
    backbone = method.backbone

    def backbone_step() -> None:
        with autocast(device, train.precision):
            loss = sum(f.float().sum() for f in encode_by_size(backbone, inputs))  # same-size views together
        loss.backward()
        backbone.zero_grad(set_to_none=True)

    def ceiling_step() -> None:
        backbone_step()
        with torch.no_grad(), autocast(device, train.precision):
            for encoder, x in key_inputs:
                encoder(x)

    backbone_rate = batch / _timed(backbone_step, steps, warmup, device)
    ceiling = batch / _timed(ceiling_step, steps, warmup, device) if key_inputs else backbone_rate
    data_rate = batch / _timed(data_step, steps, warmup, device)
    step_rate = batch / _timed(train_step, steps, warmup, device)
    return {
        "recipe": recipe.recipe.name,
        "method": recipe.method.name,
        "backbone": recipe.backbone.name,
        "device": str(device),
        "batch_size": batch,
        "views": [list(s[1:]) for s in shapes],
        "augment": choice.path,
        "augment_reason": choice.reason,
        "data": images.name,
        "backbone_images_per_second": backbone_rate,
        "momentum_encoder_forwards": [list(shape) for _, shape in fed],
        "ceiling_images_per_second": ceiling,
        "data_images_per_second": data_rate,
        "step_images_per_second": step_rate,
        "step_vs_ceiling": step_rate / ceiling,
        "data_vs_ceiling": data_rate / ceiling,
        "peak_memory_mb": _peak_memory_mb(device),
        "steps": steps,
    }
