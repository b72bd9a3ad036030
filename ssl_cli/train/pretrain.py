"""``ssl pretrain``: the training loop.

data -> views -> ``method.training_step`` -> backward -> optimizer step -> ``method.after_optimizer_step``
-> metrics (reporter, ``metrics.jsonl``) -> checkpoints at epoch ends. The learning rate follows a per-step
array indexed by the global step, so a resumed run picks up the schedule exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ssl_cli.artifacts.checkpoint import read_checkpoint
from ssl_cli.augment import MultiView
from ssl_cli.backbones import build_backbone, check_view_sizes, timm_kwargs
from ssl_cli.config import recipe_from_dict
from ssl_cli.config.schema import Recipe
from ssl_cli.data import ImageSet, open_dataset
from ssl_cli.data.batches import AugmentChoice, BatchedEpochs, CroppedEpochs, choose_augment
from ssl_cli.data.loader import ViewDataset, mix_seed, resolve_workers, train_loader
from ssl_cli.distributed import (
    DistEnv,
    all_reduce_mean,
    barrier,
    data_parallel,
    env_rank,
    init_from_env,
    launched_by_torchrun,
)
from ssl_cli.errors import CheckpointError, DataError, TrainingError
from ssl_cli.methods import Method, StepOutput, get_method
from ssl_cli.runtime import Reporter, SilentReporter, autocast, resolve_device
from ssl_cli.schedules import lr_schedule, weight_decay_schedule
from ssl_cli.train.checkpoint import load_optimizer, restore_rng, save_checkpoint
from ssl_cli.train.monitors import OnlineMonitors, check_resume_monitors
from ssl_cli.train.optim import build_optimizer, clip_gradients, effective_lr, set_lr, set_weight_decay
from ssl_cli.train.run_dir import RunDir, RunLock
from ssl_cli.train.sync_batchnorm import convert_global_batchnorm


@dataclass
class PretrainResult:
    checkpoint: str
    run_dir: str
    epochs: int
    steps: int
    loss: float | None
    images_per_second: float | None
    seconds: float
    monitors: dict[str, float] | None = None
    """The last held-out evaluation of the online monitors (``--val``): kNN and online classifier accuracies."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_env(recipe: Recipe) -> DistEnv:
    """The process group under torchrun (one process per device), else one process on the recipe's device."""
    if launched_by_torchrun():
        return init_from_env(recipe.train.device)
    return DistEnv(0, 1, 0, resolve_device(recipe.train.device))


def training_batches(recipe: Recipe, images: ImageSet, device: torch.device, env: DistEnv, augment: str | None = None):
    """Whole-batch augmentation on ``device``, crops in loader workers finished on ``device``, or per-sample
    augmentation in loader workers: ``augment`` (the path, ``batch``, ``crop`` or ``sample``), by default
    ``data.augment`` resolved for ``images`` (``choose_augment``)."""
    train, data = recipe.train, recipe.data
    path = augment or choose_augment(data.augment, images).path
    if path == "batch":
        return BatchedEpochs(
            images, recipe.views, data.mean, data.std, train.batch_size, train.seed, device, env.rank, env.world_size
        )
    workers = resolve_workers(data.num_workers)
    if path == "crop":
        args = (train.batch_size, train.seed, device, workers, env.rank, env.world_size)
        return CroppedEpochs(images, recipe.views, data.mean, data.std, *args)
    dataset = ViewDataset(images, MultiView(recipe.views, data.mean, data.std), train.seed)
    return train_loader(dataset, train.batch_size, workers, train.seed, env.rank, env.world_size)


def optimizer_step(
    model: torch.nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    views: list[torch.Tensor],
    index: torch.Tensor,
    step: int,
    total_steps: int,
    precision: str,
    clip_grad: float = 0.0,
) -> StepOutput:
    """One training step: forward (``model`` is the method, or DDP around it), backward, per-parameter gradient
    clipping (``optim.clip_grad``), the method's hooks around the optimizer step. Returns the step's output with the
    loss in fp32, detached."""
    with autocast(views[0].device, precision):
        out = model(views, step, index)
    loss = out.loss.float()
    optimizer.zero_grad(set_to_none=True)
    (loss if out.monitor_loss is None else loss + out.monitor_loss.float()).backward()
    if clip_grad:
        clip_gradients(method.parameters(), clip_grad)
    method.before_optimizer_step(step, total_steps)
    optimizer.step()
    method.after_optimizer_step(step, total_steps)
    return StepOutput(loss.detach(), out.metrics)


def wrap_distributed(method: Method, env: DistEnv) -> torch.nn.Module:
    """DistributedDataParallel around the method on more than one process (gradients averaged over ranks)."""
    return method if env.world_size == 1 else data_parallel(method, env.device)


def _device_batches(loader, device: torch.device, memory_format: torch.memory_format):
    """``(views, index)`` of one pass over ``loader``, on ``device``."""
    for views, _labels, index in loader:
        views = [v.to(device, non_blocking=True, memory_format=memory_format) for v in views]
        yield views, index.to(device, non_blocking=True)


def build_method(recipe: Recipe) -> Method:
    """Backbone + method for a recipe (weights initialised from the current torch seed)."""
    backbone = build_backbone(recipe.backbone)
    check_view_sizes(backbone, [v.size for v in recipe.views])
    return get_method(recipe.method.name)(recipe.method, backbone, recipe)


def checkpoint_meta(
    recipe: Recipe,
    method: Method,
    data: ImageSet,
    spec: str | None,
    epoch: int,
    step: int,
    metrics: dict,
    monitors: OnlineMonitors | None = None,
    val: str | None = None,
    augment: str | None = None,
) -> dict:
    """``augment``: the augmentation path the run takes (``data.augment`` resolved), kept for ``--resume``."""
    size = max(v.size for v in recipe.views)
    return {
        "recipe": recipe.to_dict(),
        "method": recipe.method.name,
        "backbone": {
            "name": recipe.backbone.name,
            "kwargs": timm_kwargs(recipe.backbone),
            "small_stem": recipe.backbone.small_stem,
            "norm": recipe.backbone.norm,
            "num_features": method.feature_dim,
        },
        "preprocessing": {"mean": recipe.data.mean, "std": recipe.data.std, "input_size": [3, size, size]},
        "data": {
            "spec": spec,
            "name": data.name,
            "num_images": len(data),
            "classes": data.classes,
            **({"val": val} if monitors is not None else {}),
            **({"augment": augment} if augment is not None else {}),
        },
        "epoch": epoch,
        "step": step,
        "metrics": metrics,
        **({"monitor": monitors.describe()} if monitors is not None else {}),
    }


def _check_resume(recipe: Recipe, run: RunDir) -> tuple[Any, str | None]:
    """The checkpoint to resume and the augmentation path it was trained with (None: unknown, resolve again)."""
    ckpt = read_checkpoint(run.last)
    raw = copy.deepcopy(ckpt.meta["recipe"])
    compared, taken = resume_augment(raw.get("data", {}), ckpt.meta.get("data", {}), recipe.data.augment)
    raw.setdefault("data", {})["augment"] = compared
    # compared as re-validated recipes: a key added since the run was saved takes its default on both sides, and
    # an old key name loads as the new one
    saved = recipe_from_dict(raw, source=f"{run.last} (recipe)").to_dict()
    if saved != recipe.to_dict():
        diff = _first_difference(saved, recipe.to_dict())
        raise CheckpointError(
            f"--resume: {run.last} was trained with a different recipe ({diff}); resume without --recipe/--set "
            "changes, or start a new run with another --out"
        )
    return ckpt, taken


def resume_augment(saved: dict, saved_data: dict, current: str) -> tuple[str, str | None]:
    """A resumed run's ``data.augment``: (the saved value as compared with ``current``, the path the run took).

    ``saved``: the checkpoint recipe's ``data`` table; ``saved_data``: the checkpoint's ``data`` metadata, where the
    path taken is recorded. A checkpoint saved before ``auto`` existed has no ``data.augment`` and was trained with
    ``sample`` (then the default). ``auto`` now (the default, also what a run folder's old ``recipe.toml`` loads as)
    resumes on the path the run took, as does naming that path; another setting is a different recipe.
    """
    setting = saved.get("augment", "sample")
    taken = saved_data.get("augment") or (None if setting == "auto" else setting)
    if current == "auto" or current == taken:
        return current, taken
    return setting, taken


def resolve_augment(recipe: Recipe, images: ImageSet, resumed_with: str | None = None) -> AugmentChoice:
    """The run's augmentation path: the one a resumed run was trained with, else ``data.augment`` resolved."""
    if resumed_with is None:
        return choose_augment(recipe.data.augment, images)
    return AugmentChoice(choose_augment(resumed_with, images).path, "as the resumed run was trained")


def warmup_warning(warmup_epochs: float, epochs: int) -> str | None:
    """One line when the warm-up is as long as the run or longer (the rate never reaches its peak), with a fix."""
    if warmup_epochs <= 0 or warmup_epochs < epochs:
        return None
    suggested = max(0.1, round(epochs / 10, 1))  # about 10% of the run

    def n_epochs(n: float) -> str:
        return f"{n:g} epoch{'' if n == 1 else 's'}"

    return (
        f"warning: the warm-up ({n_epochs(warmup_epochs)}) is as long as the run ({n_epochs(epochs)}) or longer, so "
        f"the learning rate never reaches its peak; --set schedule.warmup_epochs={suggested:g} warms up over ~10% of it"
    )


def _augment_notes(recipe: Recipe, choice: AugmentChoice, device: torch.device, reporter: Reporter) -> None:
    """The run's first lines after the folder: the augmentation path and why, a warm-up longer than the run."""
    workers = resolve_workers(recipe.data.num_workers)
    per_image = f"per image in {workers} loader worker{'s' if workers != 1 else ''}" if workers else "per image"
    if choice.path == "batch":
        how = f"whole batches on {device.type}"
    elif choice.path == "crop":
        how = f"decode + crop {per_image}, the rest in whole batches on {device.type}"
    else:
        how = per_image
    reporter.log(f"augmentation: {choice.path}, {how} ({choice.reason})")
    warning = warmup_warning(recipe.schedule.warmup_epochs, recipe.train.epochs)
    if warning is not None:
        reporter.log(warning)


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{prefix}{i}.")
    return f"{prefix.rstrip('.')}: {a!r} then, {b!r} now"


@dataclass
class _Training:
    """Everything a run sets up before its first step (``_set_up``), read by the epoch loop."""

    recipe: Recipe
    data: str | None
    val: str | None
    env: DistEnv
    run: RunDir
    reporter: Reporter
    images: ImageSet
    augment: AugmentChoice
    monitors: OnlineMonitors | None
    method: Method
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    lrs: Any
    wds: Any

    @property
    def global_batch(self) -> int:
        return self.recipe.train.batch_size * self.env.world_size

    @property
    def main(self) -> bool:
        return self.env.rank == 0


@dataclass
class _EpochSums:
    """Running sums of one epoch's steps, on the device (no host sync per step)."""

    loss: torch.Tensor
    steps: int = 0
    images: int = 0
    method: dict[str, torch.Tensor] = field(default_factory=dict)
    """The method's own monitors (``StepOutput.metrics``), averaged over the epoch."""

    def means(self) -> dict[str, float]:
        return {k: float(v) / max(self.steps, 1) for k, v in self.method.items()}


def _build_model(recipe: Recipe, env: DistEnv, monitors: OnlineMonitors | None) -> Method:
    torch.manual_seed(recipe.train.seed)
    method = build_method(recipe)
    if monitors is not None:
        monitors.attach(method)
    if env.world_size > 1 and recipe.train.sync_batchnorm:
        method = convert_global_batchnorm(method)
    method = method.to(env.device)
    return method.to(memory_format=torch.channels_last) if recipe.train.channels_last else method


def _set_up(
    recipe: Recipe, data: str | None, out: Path, resume: bool, reporter: Reporter | None, val: str | None
) -> tuple[_Training, Any]:
    """The process group, the run folder, the data, the method and its optimizer and schedules; with ``resume``, the
    checkpoint to continue from."""
    env = resolve_env(recipe)
    world, train = env.world_size, recipe.train
    reporter = (reporter or SilentReporter()) if env.rank == 0 else SilentReporter()  # progress from rank 0 only
    run = RunDir(Path(out))
    ckpt, resumed_with = _check_resume(recipe, run) if resume else (None, None)
    global_batch = train.batch_size * world
    images = open_dataset(data, role="train").cached(recipe.data.cache)
    augment = resolve_augment(recipe, images, resumed_with)
    if len(images) < global_batch:
        batch = f"{global_batch}" if world == 1 else f"{train.batch_size} x {world} processes = {global_batch}"
        raise DataError(f"{images.name} has {len(images)} images, fewer than one batch ({batch}); lower --batch-size")
    monitors = OnlineMonitors.open(recipe, images, val) if val is not None else None
    method = _build_model(recipe, env, monitors)
    groups = method.param_groups()
    if monitors is not None:
        groups = monitors.param_groups(groups, method, effective_lr(recipe.optim, global_batch))
    steps_per_epoch = len(images) // global_batch
    lrs = lr_schedule(recipe.schedule, effective_lr(recipe.optim, global_batch), steps_per_epoch, train.epochs)
    t = _Training(
        recipe, data, val, env, run, reporter, images, augment, monitors, method,
        build_optimizer(groups, recipe.optim, global_batch), steps_per_epoch, lrs,
        weight_decay_schedule(recipe.optim, steps_per_epoch * train.epochs),
    )  # fmt: skip
    if t.main:
        leftovers = run.remove_leftovers()
        run.prepare(recipe, resume)
        if leftovers:
            reporter.log(leftovers)
    barrier()
    _start_notes(t)
    method.bind_data(len(images), images.labels.clone() if images.labeled else None)
    return t, ckpt


def _start_notes(t: _Training) -> None:
    world, reporter = t.env.world_size, t.reporter
    reporter.log(
        f"run folder: {t.run.root}" + (f" ({world} processes, global batch {t.global_batch})" if world > 1 else "")
    )
    if t.monitors is not None:
        m, knn = t.monitors, t.monitors.config.knn
        reporter.log(
            f"monitors on {m.val.name} ({len(m.val)} images): "
            + (f"kNN (k={knn.k}) every {knn.every} epoch(s)" if knn.every else "no kNN")
            + (f", online linear classifier (lr {m.online_lr:g})" if m.online_linear else "")
        )
    _augment_notes(t.recipe, t.augment, t.env.device, reporter)


def _resume(t: _Training, ckpt: Any) -> int:
    """Load the model, optimizer and random state of ``ckpt``; the epoch to continue at."""
    check_resume_monitors(ckpt.section("model").keys(), t.monitors, t.run.last)
    try:
        t.method.load_state_dict(ckpt.section("model"))
    except RuntimeError as e:  # e.g. a memory bank sized for another dataset
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(
            f"--resume: {t.run.last} does not fit this run's model ({first}); was it trained on other data? "
            "resume with the same --data, or start a new run with another --out"
        ) from None
    load_optimizer(t.optimizer, ckpt)
    restore_rng(ckpt)
    # from the epoch: a run resumed with another number of processes has another number of steps per epoch
    start_epoch = int(ckpt.meta["epoch"])
    if t.main:
        note = t.run.truncate_metrics(start_epoch)
        if note:
            t.reporter.log(note)
    t.reporter.log(f"resuming {t.run.last} at epoch {start_epoch}, step {start_epoch * t.steps_per_epoch}")
    return start_epoch


def _train_epoch(t: _Training, model: torch.nn.Module, loader: Any, epoch: int, step: int) -> tuple[int, _EpochSums]:
    """One epoch of optimizer steps from global step ``step``; the step after it and the epoch's sums."""
    recipe, train, device = t.recipe, t.recipe.train, t.env.device
    memory_format = torch.channels_last if train.channels_last else torch.contiguous_format
    total_steps = t.steps_per_epoch * train.epochs
    loader.sampler.set_epoch(epoch)
    if t.env.world_size > 1:  # per-rank random streams (shuffle-BN, noise samples), the same after a resume
        torch.manual_seed(mix_seed(train.seed, epoch, t.env.rank))
    t.method.epoch_start(epoch, lambda: _device_batches(loader, device, memory_format))
    started, sums = time.perf_counter(), _EpochSums(torch.zeros((), device=device))
    for views, index in _device_batches(loader, device, memory_format):
        set_lr(t.optimizer, float(t.lrs[step]))
        if t.wds is not None:
            set_weight_decay(t.optimizer, float(t.wds[step]), recipe.optim.weight_decay)
        out = optimizer_step(
            model, t.method, t.optimizer, views, index, step, total_steps, train.precision, recipe.optim.clip_grad
        )
        step += 1
        sums.steps += 1
        sums.loss += out.loss.detach()
        for name, value in out.metrics.items():
            sums.method[name] = sums.method.get(name, 0.0) + value.detach().float()
        sums.images += views[0].shape[0] * t.env.world_size
        if sums.steps % 10 == 0 or sums.steps == t.steps_per_epoch:
            _report_progress(t, epoch, step, sums, time.perf_counter() - started)
    return step, sums


def _report_progress(t: _Training, epoch: int, step: int, sums: _EpochSums, elapsed: float) -> None:
    # the only host sync of the step loop: divergence is caught here (on every rank alike, from the ranks' mean),
    # before any checkpoint
    mean_loss = float(all_reduce_mean(sums.loss)) / sums.steps
    if not math.isfinite(mean_loss):
        raise TrainingError(
            f"loss became {mean_loss} at epoch {epoch + 1}, step {step}; lower optim.lr or check the "
            f"data (checkpoints so far are kept in {t.run.checkpoints})"
        )
    metrics = {"loss": mean_loss, "lr": float(t.lrs[step - 1])}
    metrics["images_per_second"] = sums.steps * t.global_batch / max(elapsed, 1e-9)
    metrics.update(sums.means())
    t.reporter.update(step, epoch, metrics)


def _end_epoch(
    t: _Training, epoch: int, step: int, sums: _EpochSums, seconds: float
) -> tuple[float, dict[str, float] | None]:
    """The epoch's record (metrics, monitors) reported, logged and checkpointed; its loss and the held-out
    evaluation of the monitors if one was due."""
    record = {
        "epoch": epoch + 1,
        "step": step,
        "loss": float(all_reduce_mean(sums.loss)) / max(sums.steps, 1),
        "lr": float(t.lrs[step - 1]),
        "images_per_second": sums.steps * t.global_batch / max(seconds, 1e-9),
        "seconds": seconds,
        **{k: float(all_reduce_mean(v)) / max(sums.steps, 1) for k, v in sorted(sums.method.items())},
        **t.method.epoch_end(epoch + 1),
    }
    evaluation = None
    if t.monitors is not None and t.main and t.monitors.due(epoch + 1):
        evaluation = t.monitors.evaluate(t.method, t.env.device)
        record.update(evaluation)
    t.reporter.epoch_end(record)
    if t.main:  # one writer; the other ranks wait, so none runs ahead of a checkpoint it may resume from
        t.run.log_metrics(record)
        meta = checkpoint_meta(
            t.recipe, t.method, t.images, t.data, epoch + 1, step, record, t.monitors, t.val, t.augment.path
        )
        meta["world_size"] = t.env.world_size
        save_checkpoint(t.run.last, t.method, t.optimizer, meta)
        every = t.recipe.train.checkpoint_every
        if every and (epoch + 1) % every == 0:
            save_checkpoint(t.run.epoch_checkpoint(epoch + 1), t.method, t.optimizer, meta)
    barrier()
    return record["loss"], evaluation


def pretrain(
    recipe: Recipe,
    data: str | None,
    out: Path,
    resume: bool = False,
    reporter: Reporter | None = None,
    val: str | None = None,
) -> PretrainResult:
    """Train ``recipe`` on ``data`` (a folder, a dataset name, or None for the demo set) into ``out``.

    ``val``: labeled held-out images (folder, dataset name, ``demo:test``) for the online monitors (kNN, online
    linear classifier; ``ssl_cli.train.monitors``). The whole of ``ssl pretrain`` (demo settings, resume from a run
    folder's own recipe and data, torchrun set-up) is ``ssl_cli.train.launch.run_pretraining``. The run folder is
    locked for the whole run (``RunLock``): a second run into it stops with one line."""
    with RunLock(Path(out)) if env_rank() == 0 else contextlib.nullcontext():
        return _pretrain(recipe, data, out, resume, reporter, val)


def _pretrain(
    recipe: Recipe, data: str | None, out: Path, resume: bool, reporter: Reporter | None, val: str | None
) -> PretrainResult:
    t, ckpt = _set_up(recipe, data, out, resume, reporter, val)
    epochs = recipe.train.epochs
    start_epoch = _resume(t, ckpt) if ckpt is not None else 0
    step = start_epoch * t.steps_per_epoch
    if start_epoch >= epochs:
        t.reporter.log(f"the run is already complete ({epochs} epochs); nothing to train")
        loss = ckpt.meta.get("metrics", {}).get("loss")
        return PretrainResult(str(t.run.last), str(t.run.root), epochs, step, loss, None, 0.0)

    loader = training_batches(recipe, t.images, t.env.device, t.env, t.augment.path)
    model = wrap_distributed(t.method, t.env)
    t.reporter.start(t.steps_per_epoch * epochs, step, epochs)
    started, trained_images, loss, evaluation = time.perf_counter(), 0, None, None
    t.method.train()
    for epoch in range(start_epoch, epochs):
        epoch_started = time.perf_counter()
        step, sums = _train_epoch(t, model, loader, epoch, step)
        loss, due = _end_epoch(t, epoch, step, sums, time.perf_counter() - epoch_started)
        evaluation = due or evaluation
        trained_images += sums.images
    seconds = time.perf_counter() - started
    ips = trained_images / seconds if trained_images else None
    return PretrainResult(str(t.run.last), str(t.run.root), epochs, step, loss, ips, seconds, evaluation)
