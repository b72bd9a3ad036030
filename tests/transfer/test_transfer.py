"""``ssl transfer``: label subsets, layer-wise lr decay, partial freezing, fine-tuning, the saved model, the confusion
matrix and one-line errors. Tiny data: 16x16 images of three clearly different colours, timm's ``test_resnet``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from click.testing import Result
from helpers import invoke as cli_invoke
from helpers import one_json, user_error
from PIL import Image
from safetensors.torch import load_file

from ssl_cli.artifacts.checkpoint import EXPORT_FORMAT
from ssl_cli.artifacts.safetensors_io import atomic_save
from ssl_cli.augment import eval_transform, train_eval_transform
from ssl_cli.backbones import build_backbone
from ssl_cli.config.schema import BackboneConfig
from ssl_cli.data import scan_folder
from ssl_cli.plots.confusion import confusion_matrix, per_class_accuracy, render_confusion
from ssl_cli.train.optim import set_lr
from ssl_cli.transfer.finetune import (
    FinetuneConfig,
    attach_classifier,
    build_optimizer,
    finetune,
    layer_ids,
    load_finetuned,
    lr_schedule,
    predict,
)
from ssl_cli.transfer.label_subset import (
    image_keys,
    read_subset,
    save_subset,
    select_subset,
    subset_from_indices,
    subset_indices,
)

COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}  # sorted: the class order
SIZE = 16
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
FAST = ["--device", "cpu", "--num-workers", "0", "--quiet"]


def invoke(*args: str | Path) -> Result:
    return cli_invoke(*args, columns=200)


def write_colour_folder(root: Path, per_class: int, seed: int) -> Path:
    """root/<colour>/NNN.png: noisy images of one colour per class (a separable problem)."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.asarray(colour)[None, None] + rng.normal(0, 30, (SIZE, SIZE, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def write_export(path: Path, name: str = "test_resnet") -> Path:
    """An ``ssl export`` file of a randomly initialised backbone (what transfer reads from any export)."""
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(name=name))
    meta = {
        "format": EXPORT_FORMAT,
        "backbone": {"name": name, "kwargs": {}, "small_stem": False, "norm": "batchnorm"},
        "preprocessing": {"mean": MEAN, "std": STD, "input_size": [3, SIZE, SIZE]},
    }
    atomic_save(model.state_dict(), meta, path)
    return path


def transfer(world: SimpleNamespace, out: Path, *extra) -> Result:
    return invoke("transfer", world.ckpt, "--train", world.train, "--val", world.val, "--out", out, *FAST, *extra)


# lr 2.0 at batch 256 is 0.047 at batch 6: the separable problem is learnt in a few steps
RUN = ["--label-fraction", "0.5", "--epochs", "6", "--batch-size", "6", "--lr", "2.0", "--seed", "3", "--json"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """Train (12 per class) / val (6 per class) colour folders, a tiny export, and one fine-tuning run on 50%."""
    root = tmp_path_factory.mktemp("transfer")
    w = SimpleNamespace(
        root=root,
        train=write_colour_folder(root / "train", 12, seed=0),
        val=write_colour_folder(root / "val", 6, seed=1),
        ckpt=write_export(root / "backbone.safetensors"),
        out=root / "run",
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w.summary = one_json(transfer(w, w.out, *RUN))
    finally:
        torch.set_num_threads(threads)
    w.metrics = json.loads((w.out / "metrics.json").read_text())
    return w


# --- label subsets -------------------------------------------------------------------------------------------------


def _counts(labels: torch.Tensor, indices: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels[indices], minlength=num_classes).tolist()


def test_subset_is_class_balanced_seeded_and_nested() -> None:
    labels = torch.arange(3).repeat_interleave(40)[torch.randperm(120, generator=torch.Generator().manual_seed(0))]
    a = select_subset(labels, 3, 0.1, seed=0)
    assert _counts(labels, a, 3) == [4, 4, 4]
    assert torch.equal(a, select_subset(labels, 3, 0.1, seed=0))  # reproducible
    assert not torch.equal(a, select_subset(labels, 3, 0.1, seed=1))  # another seed, another subset
    assert set(select_subset(labels, 3, 0.05, seed=0).tolist()) < set(a.tolist())  # 5% within 10%, same seed
    assert _counts(labels, select_subset(labels, 3, 0.001, seed=0), 3) == [1, 1, 1]  # at least one per class
    assert _counts(labels, select_subset(labels, 3, 1.0, seed=0), 3) == [40, 40, 40]
    # round(F x class size) per class, halves up: 25 x 0.1 = 2.5 -> 3; 40 x 0.1 = 4
    uneven = torch.tensor([0] * 25 + [1] * 40 + [2] * 40)
    assert _counts(uneven, select_subset(uneven, 3, 0.1, seed=0), 3) == [3, 4, 4]


def test_subset_file_reloads_to_the_same_images(world, tmp_path: Path) -> None:
    listing = scan_folder(world.train)
    keys = image_keys(listing, world.train)
    indices = select_subset(listing.labels, 3, 0.25, seed=7)
    subset = subset_from_indices(indices, keys, listing.labels, listing.classes, 0.25, 7, "train", str(world.train))
    save_subset(subset, tmp_path / "s.json")
    again = subset_indices(read_subset(tmp_path / "s.json"), keys, listing.labels, listing.classes, "test")
    assert torch.equal(again, indices)
    assert [keys[i] for i in again] == [k for c in sorted(subset.classes) for k in subset.classes[c]]


def test_cli_subset_is_the_documented_draw_and_reuses_exactly(world, tmp_path: Path) -> None:
    saved = json.loads((world.out / "label_subset.json").read_text())
    assert (saved["fraction"], saved["seed"], saved["num_images"], saved["data"]) == (0.5, 3, 18, "train")
    listing = scan_folder(world.train)
    keys = image_keys(listing, world.train)
    expected = sorted(keys[i] for i in select_subset(listing.labels, 3, 0.5, seed=3))  # computed here, independently
    assert sorted(k for files in saved["classes"].values() for k in files) == expected
    assert {c: len(v) for c, v in saved["classes"].items()} == {"blue": 6, "green": 6, "red": 6}
    assert world.metrics["num_labeled"] == 18 and world.metrics["num_train_images"] == 36

    # train again on exactly that subset (another seed for the rest): the same images, the file copied into --out
    args = ["--label-subset", world.out / "label_subset.json", "--epochs", "1", "--batch-size", "6", "--json"]
    first = one_json(transfer(world, tmp_path / "reuse", *args))
    assert first["num_labeled"] == 18 and first["label_fraction"] == 0.5
    assert json.loads((tmp_path / "reuse" / "label_subset.json").read_text())["classes"] == saved["classes"]
    # the same command into its own folder is the same run: allowed, and deterministic
    weights = load_file(tmp_path / "reuse" / "model.safetensors")
    second = one_json(transfer(world, tmp_path / "reuse", *args))
    assert second["top1"] == first["top1"]
    again = load_file(tmp_path / "reuse" / "model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)


# --- layer-wise learning-rate decay ---------------------------------------------------------------------------------


def _vit_layer(name: str, depth: int) -> int:
    """BEiT's layer ids as timm assigns them: 0 for the embeddings, i + 1 for block i, depth + 1 for the head; timm
    puts the final norm with the last block (BEiT: with the head)."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token", "norm_pre")):
        return 0
    if name.startswith("norm."):
        return depth
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) + 1 if match else depth + 1


def _resnet_layer(name: str, blocks: list[str]) -> int:
    """0 for the stem, one id per residual block in order, the classifier last."""
    prefix = ".".join(name.split(".")[:2])
    if prefix in blocks:
        return blocks.index(prefix) + 1
    return 0 if name.startswith(("conv1", "bn1")) else len(blocks) + 1


def _group_of(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, dict]:
    by_id = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters() if id(p) in by_id}


@pytest.mark.parametrize("arch", ["test_vit", "test_resnet"])
def test_layer_decay_rates_are_lr_times_decay_to_the_depth(arch: str) -> None:
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8} if arch == "test_vit" else {}
    model = attach_classifier(timm.create_model(arch, num_classes=0, **kwargs), 5)
    cfg = FinetuneConfig("adamw", lr=0.4, weight_decay=0.05, epochs=3, warmup_epochs=1, batch_size=128, layer_decay=0.7)
    cfg = cfg.resolved()
    optimizer = build_optimizer(model, cfg)
    schedule = lr_schedule(cfg, num_images=640)  # 5 steps an epoch, 15 steps, 5 of warm-up
    peak = 0.4 * 128 / 256
    assert schedule.numel() == 15 and schedule[0] == 0 and math.isclose(schedule[5], peak)
    assert math.isclose(schedule[10], peak * (1 + math.cos(math.pi * 5 / 10)) / 2)
    if arch == "test_vit":
        depth = len(model.blocks)
        layer = {n: _vit_layer(n, depth) for n, _ in model.named_parameters()}
        top = depth + 1
    else:
        blocks = sorted({".".join(n.split(".")[:2]) for n, _ in model.named_parameters() if n.startswith("layer")})
        layer = {n: _resnet_layer(n, blocks) for n, _ in model.named_parameters()}
        top = len(blocks) + 1
    assert layer_ids(model) == layer  # timm's grouping is the one described
    step = 7
    set_lr(optimizer, float(schedule[step]))
    groups = _group_of(optimizer, model)
    assert set(groups) == {n for n, _ in model.named_parameters()}
    no_decay = {"cls_token", "pos_embed"}
    for name, p in model.named_parameters():
        expected = float(schedule[step]) * 0.7 ** (top - layer[name])
        assert math.isclose(groups[name]["lr"], expected, rel_tol=1e-12), name
        decayed = p.ndim > 1 and name not in no_decay
        assert groups[name]["weight_decay"] == (0.05 if decayed else 0.0), name
    assert math.isclose(groups[next(n for n in layer if layer[n] == 0)]["lr"], float(schedule[step]) * 0.7**top)


# --- partial freezing -----------------------------------------------------------------------------------------------


def test_freeze_keeps_frozen_weights_and_batchnorm_statistics(world) -> None:
    from ssl_cli.data import open_dataset

    torch.manual_seed(0)
    model = attach_classifier(build_backbone(BackboneConfig(name="test_resnet")), 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = open_dataset(str(world.train)).decoded(threads=1)
    val = open_dataset(str(world.val), role="eval").decoded(threads=1)
    cfg = FinetuneConfig(lr=2.0, epochs=2, batch_size=12, freeze=2).resolved()
    tf = train_eval_transform(SIZE, MEAN, STD), eval_transform(SIZE, MEAN, STD)
    result = finetune(model, train, val, *tf, cfg, torch.device("cpu"), num_workers=0)
    after = model.state_dict()
    # freeze 2 = the stem (conv1.*, bn1) and the first residual block, found here by name
    frozen_prefixes = ("conv1.", "bn1.", "layer1.0.")
    frozen = [k for k in before if k.startswith(frozen_prefixes)]
    assert sorted(result.frozen) == sorted(n for n, _ in model.named_parameters() if n.startswith(frozen_prefixes))
    stats = [k for k in frozen if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(stats) >= 9  # three BatchNorms in the stem, two in the block
    for k in frozen:
        assert torch.equal(before[k], after[k]), k  # weights and BN statistics bit-identical
    trained = [n for n, _ in model.named_parameters() if not n.startswith(frozen_prefixes)]
    for k in trained:
        assert not torch.equal(before[k], after[k]), k
    for k in after:
        if k.endswith("running_mean") and not k.startswith(frozen_prefixes):
            assert not torch.equal(before[k], after[k]), k


# --- fine-tuning, the saved model, the confusion matrix ---------------------------------------------------------


def test_separable_problem_is_learnt(world) -> None:
    assert world.summary["top1"] == 1.0 and world.metrics["top1"] == 1.0
    assert world.metrics["per_class_accuracy"] == {"blue": 1.0, "green": 1.0, "red": 1.0}
    lines = [json.loads(line) for line in (world.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 7))
    assert all({"loss", "lr", "val_top1"} <= set(r) for r in lines)
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert lines[-1]["val_top1"] == world.metrics["top1"]
    hyper = world.metrics["hyperparameters"]
    assert (hyper["optim"], hyper["lr"], hyper["batch_size"], hyper["epochs"]) == ("sgd", 2.0, 6, 6)
    assert math.isclose(hyper["peak_lr"], 2.0 * 6 / 256)


def _val_predictions(model: torch.nn.Module, world) -> tuple[torch.Tensor, torch.Tensor]:
    from ssl_cli.data import open_dataset

    val = open_dataset(str(world.val), role="eval")
    return predict(model, val, eval_transform(SIZE, MEAN, STD), 8, 0, torch.device("cpu"))


def test_saved_model_reloads_with_timm_and_reproduces_the_accuracy(world) -> None:
    model, meta = load_finetuned(world.out / "model.safetensors", with_meta=True)
    assert meta["classes"] == ["blue", "green", "red"] and meta["classifier"] == "fc"
    logits, labels = _val_predictions(model, world)
    assert (logits.argmax(1) == labels).float().mean().item() == world.metrics["top1"]
    plain = timm.create_model("test_resnet", num_classes=3)
    plain.load_state_dict(load_file(world.out / "model.safetensors"), strict=True)
    torch.testing.assert_close(_val_predictions(plain, world)[0], logits)


def test_confusion_matrix_counts_are_a_direct_count(world) -> None:
    logits, labels = _val_predictions(load_finetuned(world.out / "model.safetensors"), world)
    direct = [[0] * 3 for _ in range(3)]
    for t, p in zip(labels.tolist(), logits.argmax(1).tolist(), strict=True):
        direct[t][p] += 1
    assert world.metrics["confusion_matrix"] == direct
    # and the counting function itself, on predictions with errors
    g = torch.Generator().manual_seed(0)
    pred, true = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (200,), generator=g)
    counts = confusion_matrix(pred, true, 4)
    loops = [
        [sum(1 for t, p in zip(true.tolist(), pred.tolist(), strict=True) if (t, p) == (i, j)) for j in range(4)]
        for i in range(4)
    ]
    assert counts.tolist() == loops
    assert per_class_accuracy(counts) == [loops[i][i] / sum(loops[i]) for i in range(4)]
    png = Image.open(world.out / "confusion_matrix.png")
    assert png.format == "PNG" and png.width > 3 * 30 and png.height > 3 * 30
    big = render_confusion(torch.randint(0, 9, (120, 120), generator=g), [f"c{i}" for i in range(120)])
    assert big.width < 1400 and big.height < 1400  # many classes: small cells, no numbers


# --- bad inputs: one line, exit 2 ------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", ["0", "1.5", "-0.1", "nan"])
def test_label_fraction_outside_zero_one(world, tmp_path: Path, fraction: str) -> None:
    user_error(transfer(world, tmp_path / "o", "--label-fraction", fraction), "--label-fraction", "(0, 1]")
    assert not (tmp_path / "o").exists()


def test_bad_label_subsets(world, tmp_path: Path) -> None:
    user_error(transfer(world, tmp_path / "o", "--label-subset", tmp_path / "nope.json"), "not found")
    subset = json.loads((world.out / "label_subset.json").read_text())
    subset["classes"]["red"].append("red/999.png")
    (tmp_path / "s.json").write_text(json.dumps(subset))
    user_error(transfer(world, tmp_path / "o", "--label-subset", tmp_path / "s.json"), "red/999.png", "--train")
    (tmp_path / "bad.json").write_text("{not json")
    user_error(transfer(world, tmp_path / "o", "--label-subset", tmp_path / "bad.json"), "JSON")
    both = ["--label-subset", world.out / "label_subset.json", "--label-fraction", "0.1"]
    user_error(transfer(world, tmp_path / "o", *both), "one of them")
    assert not (tmp_path / "o").exists()


def test_freeze_beyond_the_layer_groups(world, tmp_path: Path) -> None:
    user_error(transfer(world, tmp_path / "o", "--freeze", "6"), "--freeze 6", "5 layer groups", "0-5")


def test_unlabeled_train_folder(world, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(sorted(world.train.rglob("*.png"))[:4]):
        (flat / f"{i}.png").write_bytes(p.read_bytes())
    result = invoke("transfer", world.ckpt, "--train", flat, "--val", world.val, "--out", tmp_path / "o", *FAST)
    user_error(result, "--train", "labels")


def test_a_train_folder_of_one_image_is_one_line_and_nothing_is_written(world, tmp_path: Path) -> None:
    """It failed in the first epoch with exit 1, after --out was started (run.json, an empty epochs file)."""
    one = tmp_path / "one"
    for i, name in enumerate(COLOURS):
        (one / name).mkdir(parents=True)
        if i == 0:
            (one / name / "000.png").write_bytes(next(iter(sorted((world.train / name).glob("*.png")))).read_bytes())
    result = invoke("transfer", world.ckpt, "--train", one, "--val", world.val, "--out", tmp_path / "o", *FAST)
    user_error(result, "--train one has 1 labeled image; fine-tuning needs at least 2")
    assert not (tmp_path / "o").exists()


def test_out_holding_another_result_or_files_is_refused(world, tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in world.out.iterdir()}
    user_error(transfer(world, world.out, *RUN[:-3], "--seed", "4"), "other settings", "seed")
    assert {p.name: p.read_bytes() for p in world.out.iterdir()} == before  # nothing touched
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    user_error(transfer(world, tmp_path / "busy"), "not empty", "notes.txt")
    user_error(transfer(world, world.root / "run" / "model.safetensors"), "not a folder")


def test_projector_layers_sit_in_the_classifier_slot_and_reload(tmp_path: Path) -> None:
    """SimCLR v2 fine-tunes from the projection head's first layer: it goes in front of the linear classifier."""
    from torch import nn

    from ssl_cli.export.backbone import head_spec
    from ssl_cli.transfer.finetune import finetuned_meta, save_finetuned

    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(96, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU())
    model = attach_classifier(build_backbone(BackboneConfig(name="test_resnet")), 3, head, 32, seed=1).eval()
    with torch.no_grad():  # give the BatchNorm statistics values a fresh one would not have
        head[1].running_mean.uniform_(-1, 1)
    projector = {"layers": head_spec(head), "num_layers": 1, "num_features": 32}
    source = {
        "backbone": {"name": "test_resnet", "kwargs": {}, "small_stem": False, "norm": "batchnorm"},
        "preprocessing": {"mean": MEAN, "std": STD, "input_size": [3, SIZE, SIZE]},
    }
    config = save_finetuned(
        model, finetuned_meta(source, model, ["a", "b", "c"], projector, {}), tmp_path / "m.safetensors"
    )
    assert config["projector_layers"] == 1 and "load_finetuned" in config["load"]
    assert {k for k in load_file(tmp_path / "m.safetensors") if k.startswith("fc.")} == {
        "fc.0.0.weight",
        "fc.0.1.weight",
        "fc.0.1.bias",
        "fc.0.1.running_mean",
        "fc.0.1.running_var",
        "fc.0.1.num_batches_tracked",
        "fc.1.weight",
        "fc.1.bias",
    }
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(load_finetuned(tmp_path / "m.safetensors")(x), model(x))
