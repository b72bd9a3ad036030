"""An interrupted then resumed run ends with exactly the weights of an uninterrupted one (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import Interrupt, corrupt_tensors, invoke, user_error

from conftest import TINY, write_image_folder
from ssl_cli.artifacts.checkpoint import read_checkpoint
from ssl_cli.artifacts.safetensors_io import atomic_save
from ssl_cli.config import load_recipe
from ssl_cli.runtime import SilentReporter
from ssl_cli.train.pretrain import pretrain


@pytest.mark.parametrize(
    "recipe",
    [
        # MoCo: queue, momentum encoder, shuffle-BN permutations (global RNG), SGD momentum; per-sample augmentation
        ("mocov2", [("method.queue_size", 64), ("method.shuffle_bn_splits", 2), ("data.augment", "sample")]),
        # SimCLR: LARS state, warm-up + cosine schedule position; data.augment = "auto" (whole batches here)
        ("simclr", [("schedule.warmup_epochs", 1), ("optim.name", "lars")]),
        # a worker process: persistent workers start at a different epoch after resume
        (
            "mocov2",
            [("method.queue_size", 64), ("method.shuffle_bn_splits", 2), ("data.num_workers", 1)]
            + [("data.augment", "sample")],
        ),
        # whole-batch augmentation: its generator is seeded per (seed, epoch, batch), not restored
        ("simclr", [("data.augment", "batch"), ("views.*.blur_prob", 0.5)]),
        # crops in a worker, the rest in whole batches: per-image crop seeds, per-batch generators
        ("simclr", [("data.augment", "crop"), ("data.num_workers", 1), ("views.*.blur_prob", 0.5)]),
    ],
    ids=["mocov2", "simclr", "mocov2-worker", "simclr-batch-augment", "simclr-crop-worker"],
)
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path: Path, recipe) -> None:
    name, extra = recipe
    data = str(write_image_folder(tmp_path / "data", per_class=16, classes=4))
    r = load_recipe(name, [*TINY, *extra, ("train.epochs", 3), ("train.batch_size", 16)])

    full = pretrain(r, data, tmp_path / "full")

    with pytest.raises(KeyboardInterrupt):
        pretrain(r, data, tmp_path / "cut", reporter=Interrupt(at=3))
    assert read_checkpoint(tmp_path / "cut/checkpoints/last.safetensors").meta["epoch"] == 2
    resumed = pretrain(r, data, tmp_path / "cut", resume=True)

    a = read_checkpoint(full.checkpoint)
    b = read_checkpoint(resumed.checkpoint)
    assert a.meta["step"] == b.meta["step"] == 12
    model_a, model_b = a.section("model"), b.section("model")
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    optim_a, optim_b = a.section("optim"), b.section("optim")
    assert optim_a.keys() == optim_b.keys() and all(torch.equal(optim_a[k], optim_b[k]) for k in optim_a)
    # metrics.jsonl has one line per epoch, the interrupted epoch not duplicated
    lines = (tmp_path / "cut/metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_resume_refuses_a_different_recipe(tmp_path: Path) -> None:
    from ssl_cli.errors import CheckpointError

    data = str(write_image_folder(tmp_path / "data", per_class=8, classes=2))
    r = load_recipe("simclr", [*TINY, ("train.batch_size", 8)])
    pretrain(r, data, tmp_path / "run")
    other = load_recipe("simclr", [*TINY, ("train.batch_size", 8), ("optim.lr", 0.5)])
    with pytest.raises(CheckpointError, match=r"different recipe \(optim.lr: 0.3 then, 0.5 now\)"):
        pretrain(other, data, tmp_path / "run", resume=True)


def test_resume_on_other_data_is_one_clear_error(tmp_path: Path) -> None:
    """A memory bank sized for the first data set cannot take the second: one line, the checkpoint kept."""
    from ssl_cli.errors import CheckpointError

    first = str(write_image_folder(tmp_path / "a", per_class=8, classes=2))
    second = str(write_image_folder(tmp_path / "b", per_class=8, classes=3))
    r = load_recipe("instdisc", [*TINY, ("train.batch_size", 8), ("method.nce_k", 4), ("method.loss", "softmax")])
    result = pretrain(r, first, tmp_path / "run")
    before = Path(result.checkpoint).read_bytes()
    with pytest.raises(CheckpointError, match="does not fit this run's model") as info:
        pretrain(r, second, tmp_path / "run", resume=True)
    assert "\n" not in str(info.value)
    assert Path(result.checkpoint).read_bytes() == before


class Log(SilentReporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_a_checkpoint_from_before_auto_resumes_per_sample_as_it_was_trained(tmp_path: Path) -> None:
    """Saved before data.augment = "auto": no such key, trained per sample (then the default); the run folder's
    recipe.toml now loads as "auto", which would take whole batches on these images, but the run resumes as it was
    trained and ends with the weights of an uninterrupted per-sample run."""
    from ssl_cli.errors import CheckpointError

    data = str(write_image_folder(tmp_path / "data", per_class=16, classes=4))
    extra = [*TINY, ("train.epochs", 2), ("train.batch_size", 16), ("views.*.blur_prob", 0.5)]
    sample = load_recipe("simclr", [*extra, ("data.augment", "sample")])
    full = pretrain(sample, data, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        pretrain(sample, data, tmp_path / "cut", reporter=Interrupt(at=2))
    last = tmp_path / "cut/checkpoints/last.safetensors"
    old = read_checkpoint(last)
    del old.meta["recipe"]["data"]["augment"], old.meta["data"]["augment"]  # as an older version wrote it
    atomic_save(old.tensors, old.meta, last)
    toml = tmp_path / "cut/recipe.toml"
    toml.write_text("".join(line + "\n" for line in toml.read_text().splitlines() if not line.startswith("augment")))
    current = load_recipe(str(toml))
    assert current.data.augment == "auto"

    batch = load_recipe(str(toml), [("data.augment", "batch")])  # naming the other path: a different recipe
    with pytest.raises(CheckpointError, match=r"different recipe \(data.augment: 'sample' then, 'batch' now\)"):
        pretrain(batch, data, tmp_path / "cut", resume=True)
    log = Log()
    resumed = pretrain(current, data, tmp_path / "cut", resume=True, reporter=log)
    assert "augmentation: sample, per image (as the resumed run was trained)" in log.lines
    a, b = read_checkpoint(full.checkpoint).section("model"), read_checkpoint(resumed.checkpoint).section("model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_checkpoint(resumed.checkpoint).meta["data"]["augment"] == "sample"


def test_a_checkpoint_without_the_keys_added_since_resumes_as_the_same_recipe(tmp_path: Path) -> None:
    """Resume compares re-validated recipes: a key added since a run was saved (absent from its checkpoint and its
    recipe.toml) takes its schema default on both sides, and an old key name loads as the new one."""
    from ssl_cli.errors import CheckpointError

    data = str(write_image_folder(tmp_path / "data", per_class=8, classes=2))
    r = load_recipe("byol", [*TINY, ("train.batch_size", 8), ("train.epochs", 2)])
    with pytest.raises(KeyboardInterrupt):
        pretrain(r, data, tmp_path / "run", reporter=Interrupt(at=2))
    last = tmp_path / "run/checkpoints/last.safetensors"
    old = read_checkpoint(last)
    saved = old.meta["recipe"]
    for section, key in [("backbone", "pos_embed"), ("optim", "clip_grad"), ("schedule", "warmup_start")]:
        del saved[section][key]  # as a version before these keys wrote it
    del saved["monitor"], saved["method"]["proj_norm"]
    saved["method"]["tau_base"] = saved["method"].pop("momentum")  # BYOL's old name of the EMA rate
    atomic_save(old.tensors, old.meta, last)
    resumed = pretrain(r, data, tmp_path / "run", resume=True)
    assert read_checkpoint(resumed.checkpoint).meta["epoch"] == 2
    # a new key's default still counts as a value: setting it otherwise is a different recipe
    other = load_recipe("byol", [*TINY, ("train.batch_size", 8), ("train.epochs", 3), ("optim.clip_grad", 1.0)])
    with pytest.raises(CheckpointError, match=r"optim.clip_grad: 0.0 then, 1.0 now"):
        pretrain(other, data, tmp_path / "run", resume=True)


def test_a_torn_last_metrics_line_and_leftover_temporary_files_do_not_stop_a_resume(tmp_path: Path) -> None:
    """A kill while metrics.jsonl was appended leaves half a line; one during a checkpoint write leaves a hidden
    temporary file. The resume drops the one (saying so), removes the other, and ends as an uninterrupted run."""
    data = str(write_image_folder(tmp_path / "data", per_class=8, classes=2))
    r = load_recipe("simclr", [*TINY, ("train.batch_size", 8), ("train.epochs", 2)])
    full = pretrain(r, data, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        pretrain(r, data, tmp_path / "cut", reporter=Interrupt(at=2))
    metrics = tmp_path / "cut/metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"epoch": 2, "step": 4, "lo')  # torn: the process died mid-write
    leftovers = [tmp_path / "cut/checkpoints/.last.safetensors.k2j4x8.tmp", tmp_path / "cut/.recipe.toml.a1b2.tmp"]
    for p in leftovers:
        p.write_bytes(b"\0" * 4096)
    mine = tmp_path / "cut/checkpoints/.notes.tmp"  # not a temporary file of the run's own writes: kept
    mine.write_text("x")
    log = Log()
    resumed = pretrain(r, data, tmp_path / "cut", resume=True, reporter=log)
    assert any("dropped its torn last line 2" in line for line in log.lines)
    assert any("removed 2 temporary file(s)" in line for line in log.lines)
    assert not any(p.exists() for p in leftovers) and mine.exists()
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2]
    a, b = read_checkpoint(full.checkpoint).section("model"), read_checkpoint(resumed.checkpoint).section("model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_broken_metrics_line_before_the_last_is_one_error_and_nothing_is_lost(tmp_path: Path) -> None:
    from ssl_cli.errors import CheckpointError

    data = str(write_image_folder(tmp_path / "data", per_class=8, classes=2))
    r = load_recipe("simclr", [*TINY, ("train.batch_size", 8), ("train.epochs", 3)])
    with pytest.raises(KeyboardInterrupt):
        pretrain(r, data, tmp_path / "cut", reporter=Interrupt(at=3))
    metrics = tmp_path / "cut/metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("garbage\n" + lines[1] + "\n")
    before = metrics.read_bytes()
    with pytest.raises(CheckpointError, match="metrics.jsonl line 1 is not a JSON object"):
        pretrain(r, data, tmp_path / "cut", resume=True)
    assert metrics.read_bytes() == before


def test_resume_refuses_a_last_checkpoint_whose_bytes_changed_and_keeps_the_run(tmp_path: Path) -> None:
    """Weights changed on disk after writing (a bad disk, a bad copy): one line naming the file, the run untouched;
    the epoch checkpoint the line points to is whole."""
    data = str(write_image_folder(tmp_path / "data", per_class=4, classes=2))
    pretrain(load_recipe("simclr", [*TINY, ("train.batch_size", 8)]), data, tmp_path / "run")
    last = corrupt_tensors(tmp_path / "run/checkpoints/last.safetensors")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    result = invoke("pretrain", "--out", tmp_path / "run", "--resume", "--quiet")
    user_error(result, f"error: {last}: its tensors do not match", "epoch_NNNN", "copy it to last.safetensors")
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    assert read_checkpoint(tmp_path / "run/checkpoints/epoch_0001.safetensors").meta["epoch"] == 1


def _extension_run(tmp_path: Path, out: str, kill_epoch: int | None = None):
    """A 2-epoch run (warm-up + cosine) extended to 4 epochs with --extend-to; ``kill_epoch``: Ctrl-C at that epoch's
    end (before its checkpoint) during the extension, then a plain --resume."""
    from ssl_cli.train.launch import run_pretraining

    data = write_image_folder(tmp_path / "data", per_class=16, classes=4)  # 64 images, batch 16: 4 steps an epoch
    over = [*TINY, ("train.batch_size", 16), ("train.epochs", 2), ("schedule.warmup_epochs", 1)]
    run_pretraining("simclr", str(data), tmp_path / out, overrides=over)
    if kill_epoch is None:
        return run_pretraining(None, None, tmp_path / out, resume=True, extend_to=4)
    with pytest.raises(KeyboardInterrupt):
        run_pretraining(None, None, tmp_path / out, resume=True, extend_to=4, reporter=Interrupt(at=kill_epoch))
    return run_pretraining(None, None, tmp_path / out, resume=True)


def test_extend_to_trains_a_finished_run_on_with_a_recorded_schedule_segment(tmp_path: Path) -> None:
    from ssl_cli.schedules import lr_schedule
    from ssl_cli.train.optim import effective_lr

    result = _extension_run(tmp_path, "run")
    ckpt = read_checkpoint(result.checkpoint)
    assert (ckpt.meta["epoch"], ckpt.meta["step"]) == (4, 16)
    assert ckpt.meta["schedule_segments"] == [[0, 2], [8, 4]]
    assert load_recipe(str(tmp_path / "run/recipe.toml")).train.epochs == 4
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    r = ckpt.recipe
    planned_for_4 = lr_schedule(r.schedule, effective_lr(r.optim, 16), 4, 4)
    planned_for_2 = lr_schedule(r.schedule, effective_lr(r.optim, 16), 4, 2)
    assert records[1]["lr"] == pytest.approx(float(planned_for_2[7]))  # the first segment as it ran
    assert records[2]["lr"] == pytest.approx(float(planned_for_4[11]))  # the extension: the 4-epoch plan
    assert records[3]["lr"] == pytest.approx(float(planned_for_4[15]))


def test_an_extended_run_interrupted_and_resumed_ends_bit_identical(tmp_path: Path) -> None:
    whole = read_checkpoint(_extension_run(tmp_path, "whole").checkpoint)
    resumed = read_checkpoint(_extension_run(tmp_path, "cut", kill_epoch=4).checkpoint)
    assert resumed.meta["schedule_segments"] == whole.meta["schedule_segments"] == [[0, 2], [8, 4]]
    for section in ("model", "optim"):
        a, b = whole.section(section), resumed.section(section)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), section


def test_extend_to_errors_are_one_line_and_keep_the_run(tmp_path: Path) -> None:
    from helpers import invoke, user_error

    data = write_image_folder(tmp_path / "data", per_class=8, classes=2)
    sets = [f"--set={k}={v}" for k, v in TINY if k != "train.batch_size"]
    out = tmp_path / "run"
    assert (
        invoke("pretrain", "--recipe", "simclr", "--data", data, "--out", out, "--batch-size", "8", *sets).exit_code
        == 0
    )
    before = (out / "checkpoints/last.safetensors").read_bytes()
    user_error(invoke("pretrain", "--out", out, "--resume", "--extend-to", "1"), "--extend-to 1", "run of 1 epochs")
    user_error(invoke("pretrain", "--out", out, "--extend-to", "3"), "--extend-to 3 continues a run", "--resume")
    user_error(
        invoke("pretrain", "--out", out, "--resume", "--epochs", "3"), "train.epochs: 1 then, 3 now", "--extend-to"
    )
    user_error(invoke("pretrain", "--out", out, "--resume", "--extend-to", "3", "--epochs", "5"), "drop the --epochs")
    assert (out / "checkpoints/last.safetensors").read_bytes() == before


def test_a_checkpoint_that_does_not_say_its_data_needs_data_to_resume(tmp_path: Path) -> None:
    """A checkpoint without its ``data`` metadata (crafted, or edited by hand): ``--resume`` alone asks for ``--data``
    (it was a KeyError, and taking the demo data silently would be worse); with ``--data`` it resumes."""
    from helpers import invoke, rewrite_metadata, user_error

    data = write_image_folder(tmp_path / "data", per_class=8, classes=2)
    out = tmp_path / "run"
    sets = [f"--set={k}={v}" for k, v in TINY if k != "train.batch_size"]
    assert (
        invoke("pretrain", "--recipe", "simclr", "--data", data, "--out", out, "--batch-size", "8", *sets).exit_code
        == 0
    )
    last = out / "checkpoints/last.safetensors"
    rewrite_metadata(last, last, lambda meta: meta.pop("data"))
    user_error(invoke("pretrain", "--out", out, "--resume"), "does not say what data it was trained on", "--data")
    result = invoke("pretrain", "--out", out, "--resume", "--data", data, "--extend-to", "2")
    assert result.exit_code == 0, result.stderr
