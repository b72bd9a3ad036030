"""Mid-epoch checkpoints: ``train.checkpoint_every_steps`` / ``_minutes`` write ``last`` inside an epoch, and a run
resumed from one ends bit-identical to an uninterrupted run (sampler position, running sums, per-epoch state)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ssl_cli.train.pretrain as pretrain_module
from conftest import TINY, write_image_folder
from ssl_cli.artifacts.checkpoint import read_checkpoint
from ssl_cli.config import load_recipe
from ssl_cli.errors import CheckpointError
from ssl_cli.train.epoch_state import PausePolicy
from ssl_cli.train.pretrain import pretrain


class Killed(Exception):
    """Stands for a ``kill -9``: the process ends between two steps without writing anything."""


def kill_at(monkeypatch, call: int) -> None:
    """The ``call``-th optimizer step (1-based) of the next run never happens."""
    real, calls = pretrain_module.optimizer_step, [0]

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "optimizer_step", step)


def assert_same_run(a_path: Path, b_path: Path) -> None:
    a, b = read_checkpoint(a_path), read_checkpoint(b_path)
    assert a.meta["step"] == b.meta["step"]
    for section in ("model", "optim"):
        x, y = a.section(section), b.section(section)
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), (section, key)


CASES = {
    # per-sample augmentation in a worker: the sampler skips the epoch's first batches; MoCo's queue and shuffle-BN
    "mocov2-sample-worker": (
        "mocov2",
        [("method.queue_size", 32), ("method.shuffle_bn_splits", 2), ("data.augment", "sample")]
        + [("data.num_workers", 1)],
    ),
    # whole batches: per-(epoch, batch) generators from the skipped batch index on
    "simclr-batch": ("simclr", [("data.augment", "batch"), ("views.*.blur_prob", 0.5), ("optim.name", "lars")]),
    # crops in a worker, the rest in whole batches
    "byol-crop-worker": ("byol", [("data.augment", "crop"), ("data.num_workers", 1)]),
    # k-means at each epoch start: the resumed epoch keeps the checkpoint's clusters (epoch_resume)
    "deepclusterv2": ("deepclusterv2", [("method.num_prototypes", [8, 8]), ("views.*.size", 32)]),
    # the teacher temperature follows the epoch (epoch_resume restores it)
    "dino": (
        "dino-resnet",
        [("method.num_prototypes", 64), ("method.teacher_temperature", 0.07)]
        + [("method.warmup_teacher_temperature_epochs", 3)],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_killed_mid_epoch_resumes_from_its_mid_epoch_checkpoint_bit_identical(
    tmp_path: Path, monkeypatch, case: str
) -> None:
    name, extra = CASES[case]
    data = str(write_image_folder(tmp_path / "data", per_class=16, classes=4))  # 64 images: 4 steps an epoch
    over = [*TINY, ("train.batch_size", 16), ("train.epochs", 3), ("train.checkpoint_every_steps", 3), *extra]
    r = load_recipe(name, over)
    full = pretrain(r, data, tmp_path / "full")

    kill_at(monkeypatch, 8)  # steps 3 and 6 were saved; step 6 is the 2nd of epoch 2's 4
    with pytest.raises(Killed):
        pretrain(r, data, tmp_path / "cut")
    monkeypatch.undo()
    last = read_checkpoint(tmp_path / "cut/checkpoints/last.safetensors").meta
    assert (last["epoch"], last["epoch_step"], last["step"]) == (1, 2, 6)
    resumed = pretrain(r, data, tmp_path / "cut", resume=True)

    assert_same_run(Path(full.checkpoint), Path(resumed.checkpoint))
    lines = [json.loads(x) for x in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(x) for x in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    for got, want in zip(lines, expected, strict=True):  # the resumed epoch's record covers all of its steps
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)


def test_mid_epoch_checkpoints_leave_the_training_unchanged_and_only_last_is_written(tmp_path: Path) -> None:
    data = str(write_image_folder(tmp_path / "data", per_class=16, classes=4))
    base = [*TINY, ("train.batch_size", 16), ("train.epochs", 2), ("train.checkpoint_every", 0)]
    plain = pretrain(load_recipe("simclr", base), data, tmp_path / "plain")
    saving = pretrain(load_recipe("simclr", [*base, ("train.checkpoint_every_steps", 1)]), data, tmp_path / "saving")
    assert_same_run(Path(plain.checkpoint), Path(saving.checkpoint))
    assert [p.name for p in (tmp_path / "saving/checkpoints").iterdir()] == ["last.safetensors"]
    meta = read_checkpoint(saving.checkpoint).meta
    assert meta.get("epoch_step", 0) == 0 and meta["epoch"] == 2  # the run ended on an epoch's checkpoint


def test_the_time_interval_saves_mid_epoch(tmp_path: Path, monkeypatch) -> None:
    """``checkpoint_every_minutes``: a save when that much time has passed since the last one (the clock faked)."""
    clock = [0.0]
    monkeypatch.setattr("ssl_cli.train.epoch_state.time.monotonic", lambda: clock[0])
    policy = PausePolicy(load_recipe("simclr", [("train.checkpoint_every_minutes", 2.0)]).train, 1)
    assert policy.decide(1, False) == (False, False)
    clock[0] = 119.0
    assert policy.decide(2, False) == (False, False)
    clock[0] = 120.0
    assert policy.decide(3, False) == (True, False)
    policy.saved()
    clock[0] = 200.0
    assert policy.decide(4, False) == (False, False)
    assert policy.decide(5, True) == (True, True)  # a stop signal always saves, then stops


def test_a_mid_epoch_checkpoint_resumes_only_with_its_number_of_processes(tmp_path: Path, monkeypatch) -> None:
    data = str(write_image_folder(tmp_path / "data", per_class=16, classes=4))
    over = [*TINY, ("train.batch_size", 16), ("train.epochs", 2), ("train.checkpoint_every_steps", 1)]
    r = load_recipe("simclr", over)
    kill_at(monkeypatch, 3)
    with pytest.raises(Killed):
        pretrain(r, data, tmp_path / "run")
    monkeypatch.undo()
    path = tmp_path / "run/checkpoints/last.safetensors"
    from ssl_cli.artifacts.safetensors_io import atomic_save, read_safetensors

    tensors, meta = read_safetensors(path)
    atomic_save(tensors, {**meta, "world_size": 2}, path)
    with pytest.raises(CheckpointError, match=r"middle of an epoch by 2 process\(es\); resume it with 2") as info:
        pretrain(r, data, tmp_path / "run", resume=True)
    assert "\n" not in str(info.value)


def test_inspect_shows_a_mid_epoch_checkpoint_and_the_schedule_segments(tmp_path: Path, monkeypatch) -> None:
    from helpers import invoke, ok

    from ssl_cli.train.launch import run_pretraining

    data = str(write_image_folder(tmp_path / "data", per_class=16, classes=4))
    over = [*TINY, ("train.batch_size", 16), ("train.epochs", 2), ("train.checkpoint_every_steps", 1)]
    run_pretraining("simclr", data, tmp_path / "run", overrides=over)
    kill_at(monkeypatch, 3)  # the extension's 3rd step: steps 9 and 10 saved, 10 is the 2nd of epoch 3
    with pytest.raises(Killed):
        run_pretraining(None, None, tmp_path / "run", resume=True, extend_to=3)
    monkeypatch.undo()
    shown = ok(invoke("inspect", tmp_path / "run/checkpoints/last.safetensors", columns=200)).stdout
    assert "epoch 2 of 3 + 2 steps of the next (a mid-epoch checkpoint), step 10" in shown
    assert "from step 0: 2 epochs; from step 8: 3 epochs (--extend-to)" in shown and "epoch so far" in shown
