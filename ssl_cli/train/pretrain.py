"""``ssl pretrain``: the training loop.

data -> views -> ``method.training_step`` -> backward -> optimizer step -> ``method.after_optimizer_step``
-> metrics (reporter, ``metrics.jsonl``) -> checkpoints at epoch ends (and mid-epoch ones: every
``train.checkpoint_every_steps`` / ``_minutes``, and on a stop signal). The learning rate follows a per-step array
indexed by the global step, so a resumed run picks up the schedule exactly where it stopped. ``--extend-to N`` resumes
a run with more epochs: from the step it resumes at, every schedule follows the recipe planned for N epochs, a new
segment recorded in the checkpoints (``schedule_segments``: ``[first global step, planned epochs]`` pairs).
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ssl_cli.artifacts.atomic import DiskFull, disk_full_message
from ssl_cli.artifacts.checkpoint import read_checkpoint
from ssl_cli.artifacts.state import mismatch
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
from ssl_cli.signals import Stopped, StopSignals, signal_name
from ssl_cli.train.checkpoint import checkpoint_bytes, load_optimizer, restore_rng, rng_tensors, save_checkpoint
from ssl_cli.train.epoch_state import EpochSums, PausePolicy, mid_epoch_position
from ssl_cli.train.monitors import OnlineMonitors, check_resume_monitors
from ssl_cli.train.optim import build_optimizer, clip_gradients, effective_lr, set_lr, set_weight_decay
from ssl_cli.train.placement import memory_format, place
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


# how often a run saves and where it runs, not what it trains: a resumed run may change these (a GPU run may go on on
# the CPU, with or without channels-last or torch.compile)
CADENCE_KEYS = ("checkpoint_every", "checkpoint_every_steps", "checkpoint_every_minutes")
PLACEMENT_KEYS = ("device", "channels_last", "compile")


def _check_resume(recipe: Recipe, run: RunDir, extend_to: int | None = None) -> tuple[Any, str | None]:
    """The checkpoint to resume and the augmentation path it was trained with (None: unknown, resolve again).

    The recipe must be the saved one, but for the checkpoint cadence (``CADENCE_KEYS``), the device and how the
    networks run there (``PLACEMENT_KEYS``) and, with ``extend_to``,
    ``train.epochs`` (then ``extend_to``, more than the run planned so far)."""
    ckpt = read_checkpoint(run.last)
    raw = copy.deepcopy(ckpt.meta["recipe"])
    compared, taken = resume_augment(raw.get("data", {}), ckpt.meta.get("data", {}), recipe.data.augment)
    raw.setdefault("data", {})["augment"] = compared
    # compared as re-validated recipes: a key added since the run was saved takes its default on both sides, and
    # an old key name loads as the new one
    saved, now = recipe_from_dict(raw, source=f"{run.last} (recipe)").to_dict(), recipe.to_dict()
    saved["train"].update({k: now["train"][k] for k in CADENCE_KEYS + PLACEMENT_KEYS})
    planned = saved["train"]["epochs"]
    if extend_to is not None:
        if extend_to <= planned:
            raise CheckpointError(
                f"--extend-to {extend_to}: {run.last} is a run of {planned} epochs already; give more than {planned} "
                "(to finish the planned run, --resume alone)"
            )
        saved["train"]["epochs"] = now["train"]["epochs"]
    if saved != now:
        diff = _first_difference(saved, now)
        hint = "; to train longer than planned, --resume --extend-to N" if diff.startswith("train.epochs") else ""
        raise CheckpointError(
            f"--resume: {run.last} was trained with a different recipe ({diff}); resume without --recipe/--set "
            f"changes, or start a new run with another --out{hint}"
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
    stop: StopSignals
    segments: list[list[int]]
    """``[first global step, planned epochs]`` of each schedule segment: one, more after ``--extend-to``."""

    @property
    def global_batch(self) -> int:
        return self.recipe.train.batch_size * self.env.world_size

    @property
    def main(self) -> bool:
        return self.env.rank == 0


def _build_model(recipe: Recipe, env: DistEnv, monitors: OnlineMonitors | None) -> Method:
    torch.manual_seed(recipe.train.seed)
    method = build_method(recipe)
    if monitors is not None:
        monitors.attach(method)
    if env.world_size > 1 and recipe.train.sync_batchnorm:
        method = convert_global_batchnorm(method)
    return place(method, recipe.train, env.device)


def _set_up(
    recipe: Recipe,
    data: str | None,
    out: Path,
    resume: bool,
    reporter: Reporter | None,
    val: str | None,
    extend_to: int | None = None,
) -> tuple[_Training, Any]:
    """The process group, the run folder, the data, the method and its optimizer and schedules; with ``resume``, the
    checkpoint to continue from."""
    env = resolve_env(recipe)
    world, train = env.world_size, recipe.train
    reporter = (reporter or SilentReporter()) if env.rank == 0 else SilentReporter()  # progress from rank 0 only
    run = RunDir(Path(out))
    ckpt, resumed_with = _check_resume(recipe, run, extend_to) if resume else (None, None)
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
        weight_decay_schedule(recipe.optim, steps_per_epoch * train.epochs), StopSignals(), [[0, train.epochs]],
    )  # fmt: skip
    if t.main:
        leftovers = run.remove_leftovers()
        space = run.check_free_space(
            checkpoint_bytes(method, recipe.optim.name),
            train.epochs // max(train.checkpoint_every, 1) * (train.checkpoint_every > 0),
        )
        run.prepare(recipe, resume)
        for line in (leftovers, space):
            if line:
                reporter.log(line)
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


@dataclass
class _Start:
    """Where a run (re)starts: the epoch, the global step, and in a mid-epoch checkpoint's epoch the batches done and
    the sums so far."""

    epoch: int = 0
    step: int = 0
    skip: int = 0
    sums: EpochSums | None = None


def _resume(t: _Training, ckpt: Any, extend_to: int | None) -> _Start:
    """Load the model, optimizer and random state of ``ckpt``; where to continue."""
    check_resume_monitors(ckpt.section("model").keys(), t.monitors, t.run.last)
    try:
        t.method.load_state_dict(ckpt.section("model"))
    except RuntimeError as e:  # e.g. a memory bank sized for another dataset
        first = mismatch(t.method, ckpt.section("model")) or str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(
            f"--resume: {t.run.last} does not fit this run's model ({first}); was it trained on other data? "
            "resume with the same --data, or start a new run with another --out"
        ) from None
    load_optimizer(t.optimizer, ckpt)
    restore_rng(ckpt, t.env.rank)
    # from the epoch: a run resumed with another number of processes has another number of steps per epoch
    epoch, meta = int(ckpt.meta["epoch"]), ckpt.meta
    skip = mid_epoch_position(meta, t.env.world_size, t.steps_per_epoch, t.run.last)
    start = _Start(epoch, epoch * t.steps_per_epoch + skip, skip)
    if skip:
        start.sums = EpochSums.restored(ckpt.section("sums"), meta.get("epoch_sums", {}), t.env.device)
    planned = int(meta["recipe"].get("train", {}).get("epochs", t.recipe.train.epochs))
    t.segments = [list(map(int, seg)) for seg in meta.get("schedule_segments", [[0, planned]])]
    if extend_to is not None:
        t.segments.append([start.step, extend_to])
    if t.main:
        note = t.run.truncate_metrics(epoch)
        if note:
            t.reporter.log(note)
    within = f" ({skip} of its {t.steps_per_epoch} steps done)" if skip else ""
    t.reporter.log(f"resuming {t.run.last} at epoch {epoch}{within}, step {start.step}")
    if extend_to is not None:
        t.reporter.log(
            f"extending the run from {planned} to {extend_to} epochs: from step {start.step} on, the schedules "
            f"follow the recipe planned for {extend_to} epochs"
        )
    return start


def _train_epoch(
    t: _Training, model: torch.nn.Module, loader: Any, epoch: int, start: _Start, policy: PausePolicy
) -> tuple[int, EpochSums, bool]:
    """One epoch of optimizer steps from ``start`` (its step; in a mid-epoch checkpoint's epoch, its batches done and
    sums); the step after it, the epoch's sums and whether a stop signal came (then, if the epoch is not done, the
    checkpoint where it stands is written)."""
    recipe, train, device = t.recipe, t.recipe.train, t.env.device
    layout = memory_format(train)
    total_steps = t.steps_per_epoch * train.epochs
    loader.sampler.set_epoch(epoch, start.skip)
    if start.skip:  # the epoch's start (its random streams, the method's epoch_start) is in the checkpoint
        t.method.epoch_resume(epoch)
    else:
        if t.env.world_size > 1:  # per-rank random streams (shuffle-BN, noise samples), the same after a resume
            torch.manual_seed(mix_seed(train.seed, epoch, t.env.rank))
        t.method.epoch_start(epoch, lambda: _device_batches(loader, device, layout))
    step, sums = start.step, start.sums or EpochSums(torch.zeros((), device=device))
    started = time.perf_counter()
    batches = _until_stranded(t, _device_batches(loader, device, layout))
    for views, index in batches:
        set_lr(t.optimizer, float(t.lrs[step]))
        if t.wds is not None:
            set_weight_decay(t.optimizer, float(t.wds[step]), recipe.optim.weight_decay)
        out = optimizer_step(
            model, t.method, t.optimizer, views, index, step, total_steps, train.precision, recipe.optim.clip_grad
        )
        step += 1
        sums.add(out.loss, out.metrics, views[0].shape[0] * t.env.world_size)
        if sums.steps % 10 == 0 or sums.steps == t.steps_per_epoch:
            _report_progress(t, epoch, step, sums, time.perf_counter() - started)
        save, stop = policy.decide(step, t.stop.requested)
        if sums.steps == t.steps_per_epoch:  # _end_epoch writes the epoch's checkpoint
            return step, sums, stop
        if save:
            _save_mid_epoch(t, epoch, step, sums)
            policy.saved()
        if stop:
            return step, sums, True
    if t.stop.requested and sums.steps < t.steps_per_epoch:  # the loader's workers ended with the signal
        if sums.new_steps:
            _save_mid_epoch(t, epoch, step, sums)
        return step, sums, True
    return step, sums, False


def _until_stranded(t: _Training, batches: Any) -> Any:
    """``batches``, ending early when a stop signal also ended the loader's workers before they handed over the next
    batch (a group-wide SIGTERM: PyTorch then raises "DataLoader worker ... exited unexpectedly"). One process only:
    several must agree on the step they stop at (they do, at the next step, through ``PausePolicy``)."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError:
            if t.stop.requested and t.env.world_size == 1:
                return
            raise
        yield batch


def _save_mid_epoch(t: _Training, epoch: int, step: int, sums: EpochSums) -> None:
    """``last`` in the middle of epoch ``epoch`` (0-based) after global step ``step``: where the run stands."""
    metrics = {"epoch_step": sums.steps, "loss": _finite_mean_loss(t, epoch, step, sums), "lr": float(t.lrs[step - 1])}
    tensors, saved_sums = sums.saved()
    rng = rng_tensors(t.env.world_size)
    if t.main:
        meta = _meta(t, epoch, step, metrics)
        meta.update(epoch_step=sums.steps, epoch_sums=saved_sums)
        save_checkpoint(t.run.last, t.method, t.optimizer, meta, extra=tensors, rng=rng)
    barrier()


def _meta(t: _Training, epoch: int, step: int, metrics: dict) -> dict:
    """A checkpoint's metadata after ``epoch`` whole epochs and global step ``step``."""
    meta = checkpoint_meta(
        t.recipe, t.method, t.images, t.data, epoch, step, metrics, t.monitors, t.val, t.augment.path
    )
    meta["world_size"] = t.env.world_size
    if len(t.segments) > 1:
        meta["schedule_segments"] = t.segments
    return meta


def _finite_mean_loss(t: _Training, epoch: int, step: int, sums: EpochSums) -> float:
    """The epoch's mean loss so far (over the ranks); a diverged run stops here, on every rank alike, before any
    checkpoint could keep its weights."""
    mean_loss = float(all_reduce_mean(sums.loss)) / max(sums.steps, 1)
    if not math.isfinite(mean_loss):
        raise TrainingError(
            f"loss became {mean_loss} at epoch {epoch + 1}, step {step}; lower optim.lr or check the "
            f"data (checkpoints so far are kept in {t.run.checkpoints})"
        )
    return mean_loss


def _report_progress(t: _Training, epoch: int, step: int, sums: EpochSums, elapsed: float) -> None:
    """The progress line (every 10 steps: the only host sync of the step loop)."""
    mean_loss = _finite_mean_loss(t, epoch, step, sums)
    metrics = {"loss": mean_loss, "lr": float(t.lrs[step - 1])}
    metrics["images_per_second"] = sums.new_steps * t.global_batch / max(elapsed, 1e-9)
    metrics.update(sums.means())
    t.reporter.update(step, epoch, metrics)


def _end_epoch(
    t: _Training, epoch: int, step: int, sums: EpochSums, seconds: float
) -> tuple[float, dict[str, float] | None]:
    """The epoch's record (metrics, monitors) reported, logged and checkpointed; its loss and the held-out
    evaluation of the monitors if one was due."""
    record = {
        "epoch": epoch + 1,
        "step": step,
        "loss": float(all_reduce_mean(sums.loss)) / max(sums.steps, 1),
        "lr": float(t.lrs[step - 1]),
        "images_per_second": sums.new_steps * t.global_batch / max(seconds, 1e-9),
        "seconds": seconds,
        **{k: float(all_reduce_mean(v)) / max(sums.steps, 1) for k, v in sorted(sums.method.items())},
        **t.method.epoch_end(epoch + 1),
    }
    evaluation = None
    if t.monitors is not None and t.main and t.monitors.due(epoch + 1):
        evaluation = t.monitors.evaluate(t.method, t.env.device)
        record.update(evaluation)
    t.reporter.epoch_end(record)
    rng = rng_tensors(t.env.world_size)
    if t.main:  # one writer; the other ranks wait, so none runs ahead of a checkpoint it may resume from
        t.run.log_metrics(record)
        meta = _meta(t, epoch + 1, step, record)
        save_checkpoint(t.run.last, t.method, t.optimizer, meta, rng=rng)
        every = t.recipe.train.checkpoint_every
        if every and (epoch + 1) % every == 0:
            save_checkpoint(t.run.epoch_checkpoint(epoch + 1), t.method, t.optimizer, meta, rng=rng)
    barrier()
    return record["loss"], evaluation


def pretrain(
    recipe: Recipe,
    data: str | None,
    out: Path,
    resume: bool = False,
    reporter: Reporter | None = None,
    val: str | None = None,
    extend_to: int | None = None,
) -> PretrainResult:
    """Train ``recipe`` on ``data`` (a folder, a dataset name, or None for the demo set) into ``out``.

    ``val``: labeled held-out images (folder, dataset name, ``demo:test``) for the online monitors (kNN, online
    linear classifier; ``ssl_cli.train.monitors``). ``extend_to`` (with ``resume``; ``recipe.train.epochs`` equal to
    it): continue the run in ``out`` to more epochs than it planned. The whole of ``ssl pretrain`` (demo settings,
    resume from a run folder's own recipe and data, torchrun set-up) is ``ssl_cli.train.launch.run_pretraining``. The
    run folder is locked for the whole run (``RunLock``): a second run into it stops with one line. Ctrl-C, SIGTERM
    and SIGUSR1 stop the run after the step in progress and a checkpoint where it stands (:class:`Stopped`)."""
    with RunLock(Path(out)) if env_rank() == 0 else contextlib.nullcontext():
        try:
            t, ckpt = _set_up(recipe, data, out, resume, reporter, val, extend_to)
            return _train(t, ckpt, extend_to)
        except DiskFull as e:
            if e.path is None:  # before training: nothing to continue
                raise
            then = f"continue the run with: ssl pretrain --out {out} --resume"
            raise DiskFull(disk_full_message(e.path, then), e.path) from None


def _train(t: _Training, ckpt: Any, extend_to: int | None) -> PretrainResult:
    """The epochs of a set-up run, from ``ckpt`` (None: a new run) where it resumes."""
    recipe = t.recipe
    epochs = recipe.train.epochs
    start = _resume(t, ckpt, extend_to) if ckpt is not None else _Start()
    if start.epoch >= epochs:
        t.reporter.log(
            f"the run is already complete ({epochs} epochs); nothing to train (to train longer: --extend-to N)"
        )
        loss = ckpt.meta.get("metrics", {}).get("loss")
        return PretrainResult(str(t.run.last), str(t.run.root), epochs, start.step, loss, None, 0.0)

    loader = training_batches(recipe, t.images, t.env.device, t.env, t.augment.path)
    model = wrap_distributed(t.method, t.env)
    t.reporter.start(t.steps_per_epoch * epochs, start.step, epochs)
    started, trained_images, loss, evaluation = time.perf_counter(), 0, None, None
    policy = PausePolicy(recipe.train, t.env.world_size)
    t.method.train()
    with t.stop:
        for epoch in range(start.epoch, epochs):
            epoch_started = time.perf_counter()
            step, sums, stop = _train_epoch(t, model, loader, epoch, start, policy)
            trained_images += sums.new_steps * t.global_batch
            mid_epoch = sums.steps < t.steps_per_epoch
            if not mid_epoch:
                loss, due = _end_epoch(t, epoch, step, sums, time.perf_counter() - epoch_started)
                evaluation = due or evaluation
                policy.saved()
                stop = policy.stop_agreed(stop or t.stop.requested)
            if stop:
                raise _stopped(t, epoch + (not mid_epoch), step, mid_epoch)
            start = _Start(epoch + 1, step)
        policy.close()
    seconds = time.perf_counter() - started
    ips = trained_images / seconds if trained_images else None
    return PretrainResult(str(t.run.last), str(t.run.root), epochs, step, loss, ips, seconds, evaluation)


def _stopped(t: _Training, epochs_done: int, step: int, mid_epoch: bool) -> Stopped:
    """The one line of a run that a signal stopped, its checkpoint written."""
    signum = t.stop.signum or signal.SIGTERM  # another process got it
    where = f"in epoch {epochs_done + 1} (step {step})" if mid_epoch else f"after epoch {epochs_done} (step {step})"
    return Stopped(
        f"stopped by {signal_name(signum)} {where}; {t.run.last} holds the run, continue it with: "
        f"ssl pretrain --out {t.run.root} --resume",
        signum,
    )
