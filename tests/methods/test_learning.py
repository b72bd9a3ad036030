"""A short real training run beats a random encoder on kNN (the method learns something, not only runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY, write_image_folder
from ssl_cli.config import load_recipe
from ssl_cli.eval.run import run_knn, setup
from ssl_cli.train.pretrain import pretrain

# The demo shapes come in random colours: a random encoder mostly sees colour, so kNN on shape labels is
# near chance. Colour jitter + grayscale teach colour invariance within a few hundred steps.
# Margins sit below what was measured on this budget (kNN top-1 over 300 test images, random encoder 0.147; gains
# over random per seed 0 / 1 / 2 in the comments, the test runs seed 0). The demo folders are in memory at one size,
# so they take the default whole-batch augmentation (data.augment = "auto" -> "batch"); the figures were measured
# with it, after issue 14's head corrections.
METHODS = {
    # +0.163 / +0.120 / +0.093
    "simclr": ([("method.temperature", 0.2), ("optim.lr", 1.0)], 0.06),
    # the per-sample pipeline (data.augment = "sample", other random streams, same distributions): +0.113 / +0.117 /
    # +0.143
    "simclr+sample-augment": ([("method.temperature", 0.2), ("optim.lr", 1.0), ("data.augment", "sample")], 0.015),
    # MoCo, whose queue of momentum keys makes early learning slow: +0.047 / +0.033 / +0.040
    "mocov2": (
        [("method.queue_size", 512), ("method.momentum", 0.99), ("method.temperature", 0.2), ("optim.lr", 0.06)],
        0.015,
    ),
    # SimCLR v2 with its queue on (256 momentum keys = 2 steps), 8 epochs: +0.133 / +0.087 / +0.117 (5 epochs:
    # +0.113 / +0.107 / +0.030)
    "simclrv2": (
        [("method.queue_size", 256), ("method.momentum", 0.99), ("method.temperature", 0.2), ("optim.lr", 1.0)]
        + [("train.epochs", 8)],
        0.03,
    ),
    # BYOL / SimSiam with small heads (the default 4096 / 2048-wide MLPs only slow the test): BYOL +0.053 / +0.033 /
    # +0.040; SimSiam at lr 0.02 +0.070 / +0.060 / +0.023 (the recipe's 0.05: -0.010 / +0.030 / +0.013; 0.1: +0.030 /
    # +0.067 / +0.027)
    "byol": (
        [("method.proj_hidden_dim", 256), ("method.proj_output_dim", 64), ("method.pred_hidden_dim", 256)]
        + [("method.momentum", 0.99)],
        0.02,
    ),
    "simsiam": (
        [("method.proj_hidden_dim", 256), ("method.proj_output_dim", 256), ("method.pred_hidden_dim", 64)]
        + [("optim.lr", 0.02)],
        0.015,
    ),
    # InvaSpread (linear 128-d head, in-batch negatives), lr 0.05: +0.070 / +0.047 / +0.023 (lr 0.1: +0.027 / +0.037
    # / +0.003)
    "invaspread": ([("optim.lr", 0.05)], 0.015),
    # MoCo v1 (linear head): a key encoder that follows fast (m 0.9) and a short queue; with a real ResNet-18 it
    # gains +0.030 / +0.037 / +0.027 over random (0.080)
    "mocov1": (
        [("backbone.name", "resnet18"), ("method.queue_size", 128), ("method.momentum", 0.9)]
        + [("method.temperature", 0.2), ("optim.lr", 0.06)],
        0.012,
    ),
    # Barlow Twins stays at or below random with the tiny test ResNet (0.107-0.160 vs 0.143 over 12 settings x 3
    # seeds, per-sample augmentation); with a real ResNet-18 (plain stem, 512-d projector, LARS as in the -cifar
    # recipe) it learns: +0.057 / +0.063 / +0.057 over random (0.077)
    "barlowtwins-cifar": (
        [("backbone.name", "resnet18"), ("backbone.small_stem", False)]
        + [("method.proj_hidden_dim", 512), ("method.proj_output_dim", 512)],
        0.02,
    ),
}


@pytest.fixture(scope="module")
def demo_folders(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("demo")
    train = write_image_folder(root / "train", per_class=64, classes=10)
    test = write_image_folder(root / "test", per_class=30, classes=10, split="test")
    return str(train), str(test)


# MoCo v3 (ResNet, in-batch keys, 256-wide heads, tau 0.2, a momentum encoder that follows fast: m 0.9 -> 1):
# +0.050 / +0.023 / +0.033 over random (0.147) (the recipe's m 0.99: +0.013 / +0.033 / +0.060 with torch 2.14 on an
# AMD EPYC; +0.043 on every seed on the machine the other figures were measured on)
METHODS["mocov3"] = (
    [("method.proj_hidden_dim", 256), ("method.pred_hidden_dim", 256), ("method.proj_output_dim", 64)]
    + [("method.temperature", 0.2), ("method.momentum", 0.9)],
    0.015,
)

# AMDIM with its own 32x32 encoder at an eighth of its width (ndf 16, n_rkhs 128) and Adam at lr 1e-3 (the recipe's
# 2e-4 is tuned for 300 epochs): +0.037 / +0.027 / +0.090 over random (0.207: the random AMDIM encoder sees more
# than a random ResNet); lr 5e-4: -0.007 / +0.030 / +0.050; lr 3e-3 falls below random; 8 epochs: +0.050 / +0.027 /
# +0.113. The loss moves little in 50 steps (22.7 -> 22.2; log of the negatives' count at the start: 22.8)
METHODS["amdim-cifar"] = (
    [("backbone.name", "amdim_32"), ("backbone.kwargs.ndf", 16), ("backbone.kwargs.n_rkhs", 128), ("optim.lr", 1e-3)],
    0.015,
)

# YADIM with AMDIM's 32x32 encoder at an eighth of its width (ndf 16, n_rkhs 128) and Adam at lr 1e-3, as AMDIM's
# entry, 8 epochs: +0.117 / +0.060 / +0.153 over random (0.207) on seeds 0 / 1 / 2 (5 epochs: +0.083 / +0.010 /
# +0.083, seed 1 below the margin). Over 5 epochs the epoch-mean loss falls 5.05 -> 4.08 (chance with 1 positive + 63
# negatives: 4.16)
METHODS["yadim-cifar"] = (
    [("backbone.name", "amdim_32"), ("backbone.kwargs.ndf", 16), ("backbone.kwargs.n_rkhs", 128), ("optim.lr", 1e-3)]
    + [("train.epochs", 8)],
    0.03,
)

# SwAV (2 x 32 crops, 50 prototypes, no queue, prototypes frozen for the first epoch): +0.047 / +0.017 / +0.040
# over random (0.143) (lr 2.0 falls below random)
METHODS["swav-cifar"] = (
    [("backbone.small_stem", False), ("method.proj_hidden_dim", 256), ("method.num_prototypes", 50)]
    + [("method.queue_size", 0), ("method.freeze_prototypes_epochs", 1.0)],
    0.01,
)

# DINO (ResNet, 2 x 32 crops, 256 outputs, teacher momentum 0.99, teacher temperature 0.04, SGD lr 0.05, 10 epochs):
# +0.077 / +0.037 / +0.027 over random (0.143) (1024 outputs: +0.070 / +0.017 / +0.033). On this budget the
# teacher's output drifts to uniform (loss and teacher entropy at log K) while the encoder still gains; with LARS lr
# 0.3 it fell below random (-0.010 to -0.033), with the recipe's LARS + clip_lr it stayed at random (+0.003)
METHODS["dino-resnet-cifar"] = (
    [("backbone.small_stem", False), ("method.proj_hidden_dim", 256), ("method.num_prototypes", 256)]
    + [("method.momentum", 0.99), ("method.warmup_teacher_temperature_epochs", 0)]
    + [("method.teacher_temperature", 0.04), ("train.epochs", 10), ("optim.name", "sgd"), ("optim.lr", 0.05)],
    0.02,
)

# InstDisc (NCE, fixed Z, memory bank refreshed once per epoch): with the tiny test ResNet it stays at or below
# random; with a real ResNet-18 (plain stem) at the recipe's lr 0.03 it gains +0.067 / +0.040 / +0.047 over random
# (0.080) on seeds 0 / 1 / 2 (+0.020 / +0.057 / +0.013 on seeds 3 / 4 / 5), although its NCE loss grows to 500-750 as
# the features bunch up (README, CIFAR-10 table). At lr 0.1 the outcome follows float rounding: +0.023 / +0.053 /
# +0.037 before the whole-batch chain was rewritten in place, +0.007 / +0.073 / +0.043 after (views equal to 1e-5)
METHODS["instdisc"] = (
    [("backbone.name", "resnet18"), ("backbone.small_stem", False), ("method.nce_k", 1024)],
    0.02,
)


# DeepCluster v2 (3 x 300 prototypes, about 2 images per cluster; LARS lr 0.2): +0.070 / +0.043 / +0.060 over random
# (0.143) on seeds 0 / 1 / 2 (+0.030 / +0.053 / +0.010 on seeds 3 / 4 / 5). With 3 x 100 prototypes or lr 0.6 some seed
# stays at random: the loss stays near log K, the previous epoch's clusters being hard to predict from new views.
METHODS["deepclusterv2-cifar"] = (
    [("backbone.small_stem", False), ("method.proj_hidden_dim", 256), ("method.num_prototypes", [300, 300, 300])]
    + [("optim.lr", 0.2), ("optim.clip_lr", False)],  # calibrated before the recipe took solo-learn's clip_lr
    0.02,
)
# CPC v2 on the demo's grid (3x3 patches of 16 px, predicting 2 rows ahead), a 64-wide context network, AdamW lr 2e-3:
# +0.047 / +0.020 / +0.020 over random (0.160) on seeds 0 / 1 / 2, both read as the paper's linear evaluation does (the
# mean of the grid's patch features). The recipe's 7x7 grid of 8 px patches (3 rows ahead) stays at the loss of chance
# on seeds 1 and 2 in these 50 steps (32.0 = 4 x log(49 x 64)): +0.027 / -0.017 / -0.017 (lr 5e-4: -0.007 / -0.040 /
# +0.003); its earlier +0.047 / +0.020 came through the whole image, with the loss at chance too (seed 1: 32.02)
METHODS["cpcv2"] = (
    [("method.grid", 3), ("method.steps_to_ignore", 1), ("method.steps_to_predict", 2), ("method.context_dim", 64)]
    + [("optim.lr", 2e-3)],
    0.01,
)

# CMC (the recipe's one crop split into L and ab, no jitter, memory banks, NCE at tau 0.07) with 256 noise entries of
# the 640 images and GroupNorm + WS in its per-view networks: +0.230 / +0.230 / +0.210 over random (0.127) on seeds
# 0 / 1 / 2. With BatchNorm the random Lab-split encoder is already at 0.26 (eval-mode BN keeps its initial statistics;
# measured on the data they bring cmc_resnet18's 0.31 to 0.23) and no setting tried beat it on every seed: the
# recipe's settings -0.07 (seed 0), with jitter -0.13 / -0.09, in-batch InfoNCE -0.07 to -0.14, one crop per view with
# LARS -0.05 to +0.10, cmc_resnet18 -0.19 to -0.04 (the views of one crop share every pixel position, a likely cue)
METHODS["cmc"] = (
    [("backbone.name", "cmc_test_resnet"), ("backbone.norm", "groupnorm_ws"), ("method.nce_k", 256)],
    0.1,
)

# one thread for k-means: on 2 shared cores two threads ran DeepCluster v2 4x slower (60 s against 13 s)
THREADS = {"deepclusterv2-cifar": 1}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_short_training_beats_random_encoder_on_knn(name: str, demo_folders, tmp_path: Path) -> None:
    torch.set_num_threads(THREADS.get(name, 2))
    train, test = demo_folders
    overrides = [
        *TINY,
        ("train.epochs", 5),
        ("train.batch_size", 64),
        ("train.checkpoint_every", 0),
        ("views.*.blur_prob", 0.0),
        ("optim.lr_scaling", "none"),
        *METHODS[name][0],
    ]
    result = pretrain(load_recipe(name.split("+")[0], overrides), train, tmp_path / "run")
    trained = run_knn(setup(result.checkpoint, train, test, "cpu"), [20], 0.07, 256, 0)["top1"]
    random = run_knn(setup(result.checkpoint, train, test, "cpu", random_init=True), [20], 0.07, 256, 0)["top1"]
    assert trained > random + METHODS[name][1], (trained, random)
