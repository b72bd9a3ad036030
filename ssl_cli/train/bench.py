"""``ssl bench``: how close a recipe's training step comes to its backbone's own speed on this machine.

Three measurements on the recipe's device, each after a few untimed warm-up iterations:

- **ceiling**: exactly the encoder work of one real step, replayed on random tensors. One step is recorded with a
  forward hook on the backbone and on every momentum copy of it (MoCo's key encoder, BYOL's target, DINO's
  teacher): each call's input shape and whether its output carries a gradient. The ceiling replays those calls in
  order, the ones with a gradient under one backward of the sum of their features, the others without grad (MoCo v2
  without the symmetric loss: the query view forward + backward, the key view through the momentum encoder in
  shuffle-BN sub-batches, no backward). No pretraining step can be faster: it runs this plus heads, loss and
  optimizer. ``backbone_images_per_second`` replays only the calls with a gradient.
- **data**: the data path alone, from dataset indices to augmented views on the device (loader workers for
  ``data.augment = "sample"``, whole-batch augmentation for ``"batch"``).
- **step**: full training steps as ``ssl pretrain`` runs them (data, method step, backward, optimizer, momentum
  and queue updates).

The replays and the step are timed in alternation, one iteration of each per round (``_timed_rounds``), so that
machine load and allocator state weigh on them alike. Throughputs are images per second (one image = all of its
views). ``step / ceiling`` is the share of the
backbone's speed a pretraining run keeps; the data path must be well above the ceiling not to limit it.
The step's arithmetic against the ceiling's (``step_flops_vs_ceiling``: matrix products and convolutions, forward and
backward, counted by ``torch.utils.flop_counter`` over one step and one replay) gives the **compute bound**, the
ceiling scaled down by the work the method adds to the backbone's (heads, predictors, prototypes, the loss's
similarity matrices): ``step_vs_compute_bound`` is the share of it a step keeps, what is lost to everything else
(element-wise work, the optimizer, momentum updates, data, Python).
Peak memory: CUDA's peak allocation on a GPU, the process's peak resident set on the CPU.
"""

from __future__ import annotations

import itertools
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ssl_cli.config.schema import Recipe
from ssl_cli.data import open_dataset
from ssl_cli.data.batches import choose_augment
from ssl_cli.distributed import DistEnv
from ssl_cli.methods import Method
from ssl_cli.runtime import autocast, resolve_device
from ssl_cli.train.optim import build_optimizer, effective_lr, set_lr
from ssl_cli.train.placement import encoders, memory_format, place
from ssl_cli.train.pretrain import build_method, optimizer_step, training_batches


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


def _timed_rounds(runs: list[Callable[[], Any]], iterations: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds per iteration of each of ``runs``, timed in alternation (one iteration of each per round, after
    ``warmup`` untimed rounds): drift and allocator state on a busy machine affect them alike, so their ratio holds
    (timed one after the other, a backbone replay ran ~10% slower than the full step it is the ceiling of)."""
    for _ in range(warmup):
        for run in runs:
            run()
    totals = [0.0] * len(runs)
    for _ in range(iterations):
        for i, run in enumerate(runs):
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            totals[i] += time.perf_counter() - start
    return [t / iterations for t in totals]


def count_flops(run: Callable[[], Any]) -> int:
    """Floating-point operations of one ``run()`` (matrix products and convolutions, forward and backward, as
    ``torch.utils.flop_counter`` counts them; element-wise work is not counted)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


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


@dataclass(frozen=True)
class EncoderCall:
    """One call of the backbone or of a momentum copy of it during a training step."""

    module: str
    """The method's attribute holding the encoder: ``backbone``, ``key_backbone``, ``target_backbone``, ..."""
    shape: tuple[int, ...]
    """The input's shape (N x 3 x H x W)."""
    grad: bool
    """The output carries a gradient: the step's backward runs through this call."""
    options: tuple[tuple[str, Any], ...] = ()
    """The call's keyword arguments that are not tensors (CMC's ``all_views=True``: every colour view's network,
    whichever views the encoder outputs), replayed as given."""


def record_encoder_calls(method: Method, step: Callable[[], Any]) -> list[EncoderCall]:
    """The encoder calls ``step()`` makes, in order (forward hooks on ``encoders(method)``)."""
    calls: list[EncoderCall] = []

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            grad = isinstance(output, torch.Tensor) and output.requires_grad
            options = tuple(sorted((k, v) for k, v in kwargs.items() if not isinstance(v, torch.Tensor)))
            calls.append(EncoderCall(name, tuple(args[0].shape), grad, options))

        return record

    handles = [m.register_forward_hook(hook(name), with_kwargs=True) for name, m in encoders(method).items()]
    try:
        step()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def replay_step(
    method: Method,
    calls: list[EncoderCall],
    device: torch.device,
    precision: str,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Callable[[], None]:
    """A function doing exactly the encoder work of ``calls`` on random inputs: every call in order (autocast as in
    training), those with ``grad`` under one backward of the sum of their outputs, the others without grad."""
    modules = encoders(method)
    inputs = [torch.randn(c.shape, device=device).contiguous(memory_format=memory_format) for c in calls]

    def run() -> None:
        with autocast(device, precision):
            outputs = []
            for call, x in zip(calls, inputs, strict=True):
                if call.grad:
                    outputs.append(modules[call.module](x, **dict(call.options)))
                else:
                    with torch.no_grad():
                        modules[call.module](x, **dict(call.options))
        for module in modules.values():  # as the step does: the last step's gradients freed just before backward
            module.zero_grad(set_to_none=True)
        if outputs:
            # dense output gradients, as a head's backward hands the backbone (sum()'s are stride-0 expansions, which
            # make the backbone's backward slower than in a real step)
            torch.autograd.backward(outputs, [torch.ones_like(out) for out in outputs])

    return run


def bench(recipe: Recipe, data: str | None = None, steps: int = 20, warmup_steps: int = 3) -> dict[str, Any]:
    """Ceiling, data-path and step throughput of ``recipe`` (images/s), their ratios and peak memory."""
    device = resolve_device(recipe.train.device)
    train = recipe.train
    batch = train.batch_size
    torch.manual_seed(train.seed)
    method = place(build_method(recipe), train, device)
    layout = memory_format(train)
    method.train()

    images = open_dataset(data, role="train").cached(recipe.data.cache)
    choice = choose_augment(recipe.data.augment, images)
    loader = training_batches(recipe, images, device, DistEnv(0, 1, 0, device), choice.path)
    next_batch = _endless(lambda: iter(loader))

    def data_step() -> tuple[list[torch.Tensor], torch.Tensor]:
        views, _labels, index = next_batch()
        return [v.to(device, non_blocking=True, memory_format=layout) for v in views], index.to(device)

    optimizer = build_optimizer(method.param_groups(), recipe.optim, batch)
    set_lr(optimizer, effective_lr(recipe.optim, batch))
    method.bind_data(len(images), None)

    def first_batches() -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        for views, _labels, index in itertools.islice(loader, 1 + 2 * (steps + warmup_steps)):
            yield [v.to(device, non_blocking=True, memory_format=layout) for v in views], index.to(device)

    # untimed, the hook before an epoch (DeepCluster v2 fills its feature memory and runs k-means), over the batches
    # this benchmark draws (a pass's first ones, as ``next_batch`` restarts there) rather than a whole epoch
    method.epoch_start(0, first_batches)
    counter = {"step": 0}

    def train_step() -> None:
        views, index = data_step()
        total = steps + warmup_steps + 1
        optimizer_step(
            method, method, optimizer, views, index, counter["step"], total, train.precision, recipe.optim.clip_grad
        )
        counter["step"] += 1

    # one real step records the encoder calls (backbone and momentum copies, with or without grad) to replay
    calls = record_encoder_calls(method, train_step)
    with_grad = [c for c in calls if c.grad]
    runs = [replay_step(method, with_grad, device, train.precision, layout), train_step]
    if len(with_grad) < len(calls):
        runs.append(replay_step(method, calls, device, train.precision, layout))
    step_flops, ceiling_flops = count_flops(train_step), count_flops(runs[2] if len(runs) > 2 else runs[0])
    seconds = _timed_rounds(runs, steps, warmup_steps, device)
    backbone_rate, step_rate = batch / seconds[0], batch / seconds[1]
    ceiling = batch / seconds[2] if len(seconds) > 2 else backbone_rate
    shapes = [(batch, 3, v.size, v.size) for v in recipe.views for _ in range(v.count)]
    data_rate = batch / _timed(data_step, steps, warmup_steps, device)
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
        "encoder_calls": [{**asdict(c), "shape": list(c.shape), "options": dict(c.options)} for c in calls],
        "momentum_encoder_forwards": [list(c.shape) for c in calls if c.module != "backbone"],
        "ceiling_images_per_second": ceiling,
        "data_images_per_second": data_rate,
        "step_images_per_second": step_rate,
        "step_vs_ceiling": step_rate / ceiling,
        "step_flops_vs_ceiling": step_flops / ceiling_flops,
        "compute_bound_images_per_second": ceiling * ceiling_flops / step_flops,
        "step_vs_compute_bound": step_rate / (ceiling * ceiling_flops / step_flops),
        "data_vs_ceiling": data_rate / ceiling,
        "peak_memory_mb": _peak_memory_mb(device),
        "steps": steps,
    }
