"""The training loop: seeding, the per-step schedule, divergence, precision, run folders."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import pytest
import torch

from conftest import TINY, write_image_folder
from ssl_cli.artifacts.checkpoint import read_checkpoint
from ssl_cli.config import load_recipe
from ssl_cli.errors import DataError, RecipeError, TrainingError
from ssl_cli.runtime import SilentReporter, autocast, resolve_device
from ssl_cli.schedules import lr_schedule
from ssl_cli.train.optim import effective_lr
from ssl_cli.train.pretrain import pretrain, warmup_warning


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(write_image_folder(tmp_path_factory.mktemp("d") / "images", per_class=16, classes=2))


def model_of(path: str) -> dict[str, torch.Tensor]:
    return read_checkpoint(path).section("model")


def test_same_seed_same_weights_other_seed_other_weights(data: str, tmp_path: Path) -> None:
    r = load_recipe("simclr", [*TINY, ("train.batch_size", 8)])
    a = model_of(pretrain(r, data, tmp_path / "a").checkpoint)
    b = model_of(pretrain(r, data, tmp_path / "b").checkpoint)
    c = model_of(
        pretrain(
            load_recipe("simclr", [*TINY, ("train.batch_size", 8), ("train.seed", 1)]), data, tmp_path / "c"
        ).checkpoint
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_learning_rate_follows_the_per_step_schedule(data: str, tmp_path: Path) -> None:
    r = load_recipe(
        "mocov2",
        [*TINY, ("train.batch_size", 8), ("train.epochs", 2), ("schedule.warmup_epochs", 1), ("method.queue_size", 32)],
    )
    pretrain(r, data, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steps_per_epoch = 32 // 8
    expected = lr_schedule(r.schedule, effective_lr(r.optim, 8), steps_per_epoch, 2)
    assert [rec["step"] for rec in records] == [4, 8]
    assert all(0.0 <= rec["contrastive_acc"] <= 1.0 for rec in records)  # the method's monitor, per epoch
    assert [rec["lr"] for rec in records] == pytest.approx([float(expected[3]), float(expected[7])])
    # warm-up rises linearly to the peak at the end of epoch 1, then the cosine decays
    assert expected[3] == pytest.approx(effective_lr(r.optim, 8) * 3 / 4) and expected[7] < expected[4]


def test_diverging_loss_stops_with_one_line_and_keeps_checkpoints(data: str, tmp_path: Path) -> None:
    r = load_recipe(
        "simclr",
        [
            *TINY,
            ("train.batch_size", 8),
            ("train.epochs", 3),
            ("optim.name", "sgd"),
            ("optim.lr", 1e25),
            ("optim.lr_scaling", "none"),
        ],
    )
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at epoch \d, step \d+; lower optim.lr") as info:
        pretrain(r, data, tmp_path / "run")
    assert "\n" not in str(info.value) and info.value.exit_code == 1


class Log(SilentReporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_first_lines_say_which_augmentation_and_warn_of_a_warm_up_as_long_as_the_run(data: str, tmp_path) -> None:
    log = Log()
    r = load_recipe("simclr", [*TINY, ("train.batch_size", 8), ("schedule.warmup_epochs", 1)])
    pretrain(r, data, tmp_path / "auto", reporter=log)
    assert (
        log.lines[1]
        == "augmentation: batch, whole batches on cpu (auto: the 32 images of images are in memory at 32x32)"
    )
    assert log.lines[2] == (
        "warning: the warm-up (1 epoch) is as long as the run (1 epoch) or longer, so the learning rate never "
        "reaches its peak; --set schedule.warmup_epochs=0.1 warms up over ~10% of it"
    )
    assert read_checkpoint(tmp_path / "auto/checkpoints/last.safetensors").meta["data"]["augment"] == "batch"
    log = Log()
    forced = [*TINY, ("train.batch_size", 8), ("data.augment", "sample"), ("data.num_workers", 1)]
    pretrain(load_recipe("simclr", forced), data, tmp_path / "sample", reporter=log)
    assert log.lines[1:] == ["augmentation: sample, per image in 1 loader worker (data.augment = 'sample')"]


def test_images_of_several_sizes_take_the_crop_path(tmp_path) -> None:
    from PIL import Image

    root = write_image_folder(tmp_path / "mixed", per_class=8, classes=2)
    for path in sorted(root.rglob("*.png"))[::2]:
        Image.open(path).resize((40, 36)).save(path)
    log = Log()
    pretrain(load_recipe("simclr", [*TINY, ("train.batch_size", 8)]), str(root), tmp_path / "run", reporter=log)
    assert log.lines[1] == (
        "augmentation: crop, decode + crop per image, the rest in whole batches on cpu "
        "(auto: the images of mixed differ in size)"
    )
    assert read_checkpoint(tmp_path / "run/checkpoints/last.safetensors").meta["data"]["augment"] == "crop"


def test_warm_up_warning_only_when_the_peak_is_never_reached() -> None:
    assert warmup_warning(0, 5) is None and warmup_warning(4.5, 5) is None
    assert "--set schedule.warmup_epochs=0.5 " in warmup_warning(10, 5)
    assert "--set schedule.warmup_epochs=0.2 " in warmup_warning(10, 2)
    assert "--set schedule.warmup_epochs=10 " in warmup_warning(100, 100)


def test_too_few_images_for_one_batch(data: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"has 32 images, fewer than one batch \(64\); lower --batch-size"):
        pretrain(load_recipe("simclr", [*TINY, ("train.batch_size", 64)]), data, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def test_precision_bf16_on_cuda_fp32_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert isinstance(autocast(cpu, "auto"), contextlib.nullcontext)
    assert isinstance(autocast(cpu, "fp32"), contextlib.nullcontext)
    with autocast(cpu, "bf16"):  # forced bf16 works on CPU too
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available" on CPU-only machines: only the choice matters
        ctx = autocast(torch.device("cuda"), "auto")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        from ssl_cli.errors import RecipeError

        with pytest.raises(RecipeError, match="no CUDA device is available"):
            resolve_device("cuda")


@pytest.mark.parametrize("name", ["dino", "dino-cifar", "mocov3-vit", "mocov3-vit-cifar", "simclr", "dino-resnet"])
def test_every_recipe_builds_with_the_demo_settings(name: str) -> None:
    """``ssl pretrain --recipe R`` without --data: ViT recipes get a small ViT (not the ResNet, which would refuse
    their ViT options), the others the plain-stem ResNet-18."""
    from ssl_cli.config.load import builtin_recipes
    from ssl_cli.train.launch import demo_overrides
    from ssl_cli.train.pretrain import build_method

    assert name in builtin_recipes()
    base = load_recipe(name)
    recipe = load_recipe(name, demo_overrides(base.method.name, base))
    method = build_method(recipe)
    vit = name.startswith("dino-cifar") or name in ("dino", "mocov3-vit", "mocov3-vit-cifar")
    assert recipe.backbone.name == ("vit_tiny_patch16_224" if vit else "resnet18")
    if vit:
        assert len(method.backbone.blocks) == 4 and recipe.backbone.img_size == 32
        assert recipe.backbone.freeze_patch_embed == base.backbone.freeze_patch_embed


def test_all_builtin_recipes_build_with_the_demo_settings() -> None:
    from ssl_cli.config.load import builtin_recipes
    from ssl_cli.train.launch import demo_overrides
    from ssl_cli.train.pretrain import build_method

    for name in builtin_recipes():
        base = load_recipe(name)
        build_method(load_recipe(name, demo_overrides(base.method.name, base)))


def test_run_pretraining_does_what_ssl_pretrain_does(tmp_path) -> None:
    """The library entry point: a run, then --resume of its folder with the recipe and data taken from it."""
    from ssl_cli.train.launch import plan_pretraining, run_pretraining

    data = write_image_folder(tmp_path / "data", per_class=8, classes=2)
    notes: list[str] = []
    overrides = [*TINY, ("train.batch_size", 8), ("method.proj_hidden_dim", 32), ("method.proj_output_dim", 16)]
    out = tmp_path / "run"
    first = run_pretraining("simclr", str(data), out, overrides=overrides, log=notes.append)
    assert first is not None and Path(first.checkpoint).is_file() and first.steps == 2 and notes == []
    # resume: no recipe, no data; both come from the run folder (and the run is already complete)
    plan = plan_pretraining(None, None, out, True, [], None)
    assert plan.data == str(data) and plan.recipe.to_dict() == load_recipe("simclr", overrides).to_dict()
    again = run_pretraining(None, None, out, resume=True)
    assert again is not None and again.steps == first.steps and again.checkpoint == first.checkpoint
    with pytest.raises(RecipeError, match="--resume needs --out"):
        run_pretraining(None, None, None, resume=True)


def test_resume_without_recipe_toml_takes_the_checkpoints_recipe_and_other_data_is_said(tmp_path) -> None:
    """A run folder that lost its recipe.toml still resumes (the checkpoint holds the recipe; recipe.toml is written
    again), with --set overrides as usual; --resume on other --data says so in a note."""
    from helpers import Interrupt

    from ssl_cli.train.launch import plan_pretraining, run_pretraining

    data = write_image_folder(tmp_path / "data", per_class=8, classes=2)
    other = write_image_folder(tmp_path / "other", per_class=8, classes=2)
    overrides = [*TINY, ("train.batch_size", 8), ("train.epochs", 2)]
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_pretraining("simclr", str(data), out, overrides=overrides, reporter=Interrupt(at=2))
    saved = load_recipe(str(out / "recipe.toml"))
    (out / "recipe.toml").unlink()
    plan = plan_pretraining(None, None, out, True, [], None)
    assert plan.recipe.to_dict() == saved.to_dict() and plan.data == str(data) and plan.note is None
    changed = plan_pretraining(None, None, out, True, ["optim.lr=0.5"], None)
    assert changed.recipe.optim.lr == 0.5
    assert "the run was trained on " + str(data) in plan_pretraining(None, str(other), out, True, [], None).note
    resumed = run_pretraining(None, None, out, resume=True)
    assert resumed.epochs == 2 and load_recipe(str(out / "recipe.toml")).to_dict() == saved.to_dict()
