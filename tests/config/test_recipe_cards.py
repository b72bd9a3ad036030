"""Recipe cards: the published values of every paper recipe, each with its source, checked against the resolved
recipe. A wrong value in a built-in recipe (or a changed default it relies on) fails here.

Each card lists what decides whether a run is faithful: the learning rate and its batch-size rule (checked as the
paper's peak rate at the paper's batch), batch, epochs, warm-up, temperature, momentum and its schedule, queue,
head widths, crop scales, jitter / blur / solarize probabilities per view, weight decay and its exclusions.
"""

from __future__ import annotations

from typing import Any

import pytest

from ssl_cli.config import load_recipe
from ssl_cli.config.schema import Recipe, ViewConfig
from ssl_cli.train.optim import effective_lr

SIMCLR_JITTER = {"brightness": 0.8, "contrast": 0.8, "saturation": 0.8, "hue": 0.2}  # strength s = 1
MOCO_JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}
BYOL_JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
INSTDISC_JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.4}


def view(count: int, size: int, scale: list[float], jitter_prob: float, jitter: dict, grey: float, blur: float,
         solarize: float = 0.0, randaugment: dict | None = None) -> dict[str, Any]:  # fmt: skip
    card = {"count": count, "size": size, "scale": scale, "jitter_prob": jitter_prob, "jitter": jitter,
            "grayscale_prob": grey, "blur_prob": blur, "solarize_prob": solarize, "hflip_prob": 0.5}  # fmt: skip
    return card if randaugment is None else {**card, "randaugment": randaugment}


BYOL_VIEWS = [
    view(1, 224, [0.08, 1.0], 0.8, BYOL_JITTER, 0.2, 1.0, 0.0),
    view(1, 224, [0.08, 1.0], 0.8, BYOL_JITTER, 0.2, 0.1, 0.2),
]

# InfoMin's RandAugment: PyContrast datasets/util.py aug "D", rand_augment_transform("rand-n2-m10-mstd0.5") (each op
# applied with p 0.5: RandAugment.py rand_augment_ops)
INFOMIN_RANDAUGMENT = {"policy": "infomin", "n": 2, "m": 10.0, "mstd": 0.5, "prob": 0.5}

# SwAV's multi-crop (also DeepCluster v2's): 2 x 224 (0.14-1) + 6 x 96 (0.05-0.14), SimCLR's jitter, blur 0.5
SWAV_MULTI_CROP = [
    view(2, 224, [0.14, 1.0], 0.8, SIMCLR_JITTER, 0.2, 0.5),
    view(6, 96, [0.05, 0.14], 0.8, SIMCLR_JITTER, 0.2, 0.5),
]

# AMDIM (official code): Adam with its betas and L2 decay on every parameter, a step schedule after 500 warm-up updates
AMDIM_VALUES = {
    "method.tclip": 20.0,
    "method.score_reg": 0.05,
    "method.rkhs_dim": "auto",
    "backbone.kwargs": {},
    "optim.name": "adam",
    "optim.lr_scaling": "none",
    "optim.betas": [0.8, 0.999],
    "optim.weight_decay": 1e-5,
    "optim.exclude_bias_norm": False,
    "schedule.name": "step",
    "schedule.gamma": 0.2,
    "schedule.warmup_start": 2e-4 / 500,
}

# CMC (official code, train_CMC.py): memory banks and NCE, SGD on every parameter, x0.1 at 120 / 160 / 200 of 240
CMC_VALUES = {
    "method.projector": "linear",
    "method.proj_output_dim": 128,
    "method.loss": "nce",
    "method.temperature": 0.07,
    "method.nce_k": 16384,
    "method.bank_momentum": 0.5,
    "backbone.kwargs": {},  # the encoder's defaults: Lab, L vs ab, both views' vectors out
    "data.mean": [0.0, 0.0, 0.0],
    "data.std": [1.0, 1.0, 1.0],
    "optim.name": "sgd",
    "optim.momentum": 0.9,
    "optim.weight_decay": 1e-4,
    "optim.exclude_bias_norm": False,
    "schedule.name": "step",
    "schedule.milestones": [120, 160, 200],
    "schedule.gamma": 0.1,
    "train.epochs": 240,
    "train.batch_size": 128,
}
CMC_SOURCE = (
    "CMC, arXiv:1906.05849 and HobbitLong/CMC train_CMC.py defaults (lr 0.03, momentum 0.9, wd 1e-4, 240 epochs, "
    "x0.1 at 120 / 160 / 200, feat_dim 128, nce_k 16384, nce_t 0.07, nce_m 0.5, --view Lab, crop_low 0.08 for "
    "ResNets), README ResNet command (--model resnet50v1 --batch_size 128)"
)

# YADIM (Falcon & Cho 2020; the authors' lightning-bolts AMDIM module): NCE with the sum over positives between the
# last maps, Adam as AMDIM's, a constant rate
YADIM_VALUES = {
    "method.denominator": "all",
    "method.score_scale": "sqrt_dim",
    "method.tclip": 20.0,
    "backbone.kwargs": {},
    "optim.name": "adam",
    "optim.lr_scaling": "none",
    "optim.betas": [0.8, 0.999],
    "optim.weight_decay": 1e-5,
    "optim.exclude_bias_norm": False,
    "schedule.name": "constant",
    "train.batch_size": 200,
}

# recipe -> (source, peak lr at the paper's batch, values by dotted key, views)
CARDS: dict[str, tuple[str, float, dict[str, Any], list[dict[str, Any]]]] = {
    "simclr": (
        "SimCLR, arXiv:2002.05709, Sec. B.1 / B.9 and google-research/simclr README (lr 0.3 x B/256, LARS, wd 1e-6, "
        "tau 0.1 at batch 4096, 10 warm-up epochs, cosine); tf2/model.py ProjectionHead (last BN center=False)",
        4.8,
        {
            "method.temperature": 0.1,
            "method.proj_hidden_dim": 2048,
            "method.proj_output_dim": 128,
            "method.proj_layers": 2,
            "method.proj_last_batchnorm": "scale",
            "optim.name": "lars",
            "optim.lr_scaling": "linear",
            "optim.weight_decay": 1e-6,
            "optim.exclude_bias_norm": True,
            "train.batch_size": 4096,
            "schedule.name": "cosine",
            "schedule.warmup_epochs": 10,
        },
        [view(2, 224, [0.08, 1.0], 0.8, SIMCLR_JITTER, 0.2, 0.5)],
    ),
    "mocov2": (
        "MoCo v2, arXiv:2003.04297 and facebookresearch/moco main_moco.py (--mlp --aug-plus --cos: lr 0.03 at 256, "
        "wd 1e-4, 200 epochs, K 65536, m 0.999, tau 0.2, blur [0.1, 2] p 0.5)",
        0.03,
        {
            "method.temperature": 0.2,
            "method.queue_size": 65536,
            "method.momentum": 0.999,
            "method.proj_hidden_dim": 2048,
            "method.proj_output_dim": 128,
            "method.symmetric": False,
            "optim.name": "sgd",
            "optim.weight_decay": 1e-4,
            "optim.momentum": 0.9,
            "optim.exclude_bias_norm": False,
            "train.batch_size": 256,
            "train.epochs": 200,
            "schedule.name": "cosine",
            "schedule.warmup_epochs": 0,
        },
        [view(2, 224, [0.2, 1.0], 0.8, MOCO_JITTER, 0.2, 0.5)],
    ),
    "infomin": (
        "InfoMin, arXiv:2005.10243 and HobbitLong/PyContrast (main_contrast.py --method InfoMin --cosine: MoCo queue "
        "K 65536, alpha 0.999, MLP head, nce_t 0.15, SGD lr 0.03 at 256, wd 1e-4, 200 epochs, cosine to lr x 1e-3; "
        "aug D: crop 0.2 with the queue, jitter 0.8/0.8/0.8/0.2 p 0.8, blur p 0.5, RandAugment n2 m10 mstd0.5, grey "
        "0.2)",
        0.03,
        {
            "method.name": "mocov2",
            "method.temperature": 0.15,
            "method.queue_size": 65536,
            "method.momentum": 0.999,
            "method.proj_hidden_dim": 2048,
            "method.proj_output_dim": 128,
            "method.proj_batchnorm": False,
            "method.symmetric": False,
            "backbone.name": "resnet50",
            "optim.name": "sgd",
            "optim.weight_decay": 1e-4,
            "optim.momentum": 0.9,
            "optim.exclude_bias_norm": False,
            "train.batch_size": 256,
            "train.epochs": 200,
            "schedule.name": "cosine",
            "schedule.warmup_epochs": 0,
            "schedule.min_lr": 0.03 * 0.1**3,
            "data.mean": [0.485, 0.456, 0.406],
        },
        [view(2, 224, [0.2, 1.0], 0.8, SIMCLR_JITTER, 0.2, 0.5, randaugment=INFOMIN_RANDAUGMENT)],
    ),
    "mocov1": (
        "MoCo, arXiv:1911.05722, Sec. 4 and main_moco.py defaults (lr 0.03, x0.1 at 120 and 160, 200 epochs, "
        "K 65536, m 0.999, tau 0.07, 128-d linear head, jitter 0.4 always, grey 0.2)",
        0.03,
        {
            "method.temperature": 0.07,
            "method.queue_size": 65536,
            "method.momentum": 0.999,
            "method.projector": "linear",
            "method.proj_output_dim": 128,
            "optim.weight_decay": 1e-4,
            "train.batch_size": 256,
            "train.epochs": 200,
            "schedule.name": "step",
            "schedule.milestones": [120, 160],
            "schedule.gamma": 0.1,
        },
        [view(2, 224, [0.2, 1.0], 1.0, INSTDISC_JITTER, 0.2, 0.0)],
    ),
    "instdisc": (
        "InstDisc, arXiv:1805.01978, Sec. 4 and zhirongw/lemniscate.pytorch main.py (128-d, NCE 4096, tau 0.07, "
        "bank m 0.5, lr 0.03, x0.1 at 120 and 160, 200 epochs)",
        0.03,
        {
            "method.temperature": 0.07,
            "method.nce_k": 4096,
            "method.bank_momentum": 0.5,
            "method.proj_output_dim": 128,
            "optim.weight_decay": 1e-4,
            "train.batch_size": 256,
            "train.epochs": 200,
            "schedule.milestones": [120, 160],
        },
        [view(1, 224, [0.2, 1.0], 1.0, INSTDISC_JITTER, 0.2, 0.0)],
    ),
    "invaspread": (
        "InvaSpread, arXiv:1904.03436 and mangye16/Unsupervised_Embedding_Learning demo_seen.py (batch 128, lr "
        "0.03, wd 5e-4 on every parameter, tau 0.1, x0.1 / x0.05 / x0.01 of the base from 120 / 160 / 200, 301 "
        "epochs)",
        0.03,
        {
            "method.temperature": 0.1,
            "method.projector": "linear",
            "method.proj_output_dim": 128,
            "optim.weight_decay": 5e-4,
            "optim.exclude_bias_norm": False,
            "train.batch_size": 128,
            "train.epochs": 301,
            "schedule.name": "step",
            "schedule.milestones": [120, 160, 200],
            "schedule.factors": [0.1, 0.05, 0.01],
        },
        [view(2, 224, [0.2, 1.0], 1.0, INSTDISC_JITTER, 0.2, 0.0)],
    ),
    "simclrv2": (
        "SimCLR v2, arXiv:2006.10029, Sec. 2 / Appendix (LARS 0.1 x sqrt(B), wd 1e-4, batch 4096, 800 epochs, 5% "
        "warm-up, 3-layer head, memory 64K at 0.999)",
        6.4,
        {
            "method.proj_layers": 3,
            "method.proj_last_batchnorm": "scale",
            "method.queue_size": 65536,
            "method.momentum": 0.999,
            "method.temperature": 0.1,
            "optim.lr_scaling": "sqrt",
            "optim.weight_decay": 1e-4,
            "train.batch_size": 4096,
            "train.epochs": 800,
            "schedule.warmup_epochs": 40,
        },
        [view(2, 224, [0.08, 1.0], 0.8, SIMCLR_JITTER, 0.2, 0.5)],
    ),
    "byol": (
        "BYOL, arXiv:2006.07733, Sec. 3.2 / Appendix B-C (LARS 0.2 x B/256, wd 1.5e-6 without biases / BN, batch "
        "4096, 1000 epochs, 10 warm-up, tau 0.996 -> 1 cosine, heads 4096 -> 256, bias-free last layers)",
        3.2,
        {
            "method.momentum": 0.996,
            "method.momentum_final": 1.0,
            "method.proj_hidden_dim": 4096,
            "method.proj_output_dim": 256,
            "method.pred_hidden_dim": 4096,
            "method.proj_last_bias": False,
            "optim.name": "lars",
            "optim.weight_decay": 1.5e-6,
            "optim.exclude_bias_norm": True,
            "train.batch_size": 4096,
            "train.epochs": 1000,
            "schedule.warmup_epochs": 10,
        },
        BYOL_VIEWS,
    ),
    "simsiam": (
        "SimSiam, arXiv:2011.10566, Sec. 4 and facebookresearch/simsiam (SGD lr 0.05 x B/256, batch 512, wd 1e-4, "
        "100 epochs, cosine, projector 3 x 2048, predictor bottleneck 512 at a fixed lr)",
        0.1,
        {
            "method.proj_layers": 3,
            "method.proj_hidden_dim": 2048,
            "method.proj_output_dim": 2048,
            "method.pred_hidden_dim": 512,
            "method.fix_pred_lr": True,
            "optim.name": "sgd",
            "optim.weight_decay": 1e-4,
            "train.batch_size": 512,
            "train.epochs": 100,
            "schedule.name": "cosine",
        },
        [view(2, 224, [0.2, 1.0], 0.8, MOCO_JITTER, 0.2, 0.5)],
    ),
    "barlowtwins": (
        "Barlow Twins, arXiv:2103.03230, Sec. 4 and facebookresearch/barlowtwins (LARS 0.2 / biases 0.0048 x B/256, "
        "batch 2048, wd 1.5e-6, 1000 epochs, 10 warm-up, lambda 5e-3, projector 3 x 8192)",
        1.6,
        {
            "method.lambd": 5e-3,
            "method.proj_hidden_dim": 8192,
            "method.proj_output_dim": 8192,
            "method.proj_layers": 3,
            "method.bias_lr_scale": 0.0048 / 0.2,
            "optim.weight_decay": 1.5e-6,
            "train.batch_size": 2048,
            "train.epochs": 1000,
            "schedule.warmup_epochs": 10,
        },
        BYOL_VIEWS,
    ),
    "swav": (
        "SwAV, arXiv:2006.09882 and facebookresearch/swav scripts/swav_800ep_pretrain.sh (lr 4.8 at batch 4096, "
        "final 0.0048, 10 warm-up epochs from 0.3, wd 1e-6, 3000 prototypes, epsilon 0.05, 3 Sinkhorn iterations, "
        "tau 0.1, 2 x 224 (0.14-1) + 6 x 96 (0.05-0.14))",
        4.8,
        {
            "method.num_prototypes": 3000,
            "method.epsilon": 0.05,
            "method.sinkhorn_iterations": 3,
            "method.temperature": 0.1,
            "method.freeze_prototypes_epochs": 1.0,
            "method.proj_output_dim": 128,
            "optim.weight_decay": 1e-6,
            "optim.exclude_bias_norm": False,
            "train.batch_size": 4096,
            "train.epochs": 800,
            "schedule.warmup_epochs": 10,
            "schedule.warmup_start": 0.3,
            "schedule.min_lr": 0.0048,
        },
        SWAV_MULTI_CROP,
    ),
    "deepclusterv2": (
        "DeepCluster v2 in SwAV, arXiv:2006.09882, and scripts/deepclusterv2_800ep_pretrain.sh (3 x 3000 "
        "prototypes, lr 4.8 at 4096 from 0.3, final 0.0048, 800 epochs)",
        4.8,
        {
            "method.num_prototypes": [3000, 3000, 3000],
            "method.temperature": 0.1,
            "optim.weight_decay": 1e-6,
            "train.batch_size": 4096,
            "train.epochs": 800,
            "schedule.warmup_start": 0.3,
            "schedule.min_lr": 0.0048,
        },
        SWAV_MULTI_CROP,
    ),
    "mocov3": (
        "MoCo v3, arXiv:2104.02057 and facebookresearch/moco-v3 CONFIG.md ResNet-50 100 epochs (LARS 0.6 x B/256, "
        "wd 1e-6, batch 4096, tau 1.0, m 0.99 -> 1 cosine, --crop-min=.2)",
        9.6,
        {
            "method.temperature": 1.0,
            "method.momentum": 0.99,
            "method.proj_layers": 2,
            "method.proj_hidden_dim": 4096,
            "method.proj_output_dim": 256,
            "method.pred_last_batchnorm": False,
            "optim.name": "lars",
            "optim.weight_decay": 1e-6,
            "train.batch_size": 4096,
            "train.epochs": 100,
            "schedule.warmup_epochs": 10,
        },
        [{**v, "scale": [0.2, 1.0]} for v in BYOL_VIEWS],
    ),
    "mocov3-vit": (
        "MoCo v3, arXiv:2104.02057, Sec. 4-5 and CONFIG.md ViT-Small (AdamW 1.5e-4 x B/256, wd 0.1, 300 epochs, "
        "40 warm-up, tau 0.2, --stop-grad-conv1); vits.py vit_small (12 heads, sin-cos, xavier); builder.py MoCo_ViT",
        2.4e-3,
        {
            "method.temperature": 0.2,
            "method.proj_layers": 3,
            "method.pred_last_batchnorm": True,
            "backbone.freeze_patch_embed": True,
            "backbone.pos_embed": "sincos",
            "backbone.weight_init": "mocov3",
            "backbone.kwargs": {"num_heads": 12},
            "optim.name": "adamw",
            "optim.weight_decay": 0.1,
            "train.epochs": 300,
            "schedule.warmup_epochs": 40,
        },
        BYOL_VIEWS,
    ),
    "dino": (
        "DINO, arXiv:2104.14294 and facebookresearch/dino README ViT-S/16 300 epochs (AdamW 5e-4 x B/256, batch "
        "1024, wd 0.04 -> 0.4, teacher 0.04 -> 0.07 over 30 epochs, m 0.996, 65536 outputs, clip 3.0, drop path "
        "0.1, 2 x 224 (0.4-1) + 8 x 96 (0.05-0.4))",
        2e-3,
        {
            "method.num_prototypes": 65536,
            "method.student_temperature": 0.1,
            "method.teacher_temperature": 0.07,
            "method.warmup_teacher_temperature": 0.04,
            "method.warmup_teacher_temperature_epochs": 30,
            "method.center_momentum": 0.9,
            "method.momentum": 0.996,
            "method.freeze_last_layer_epochs": 1.0,
            "method.norm_last_layer": False,
            "optim.weight_decay": 0.04,
            "optim.weight_decay_end": 0.4,
            "optim.clip_grad": 3.0,
            "backbone.drop_path_rate": 0.1,
            "train.batch_size": 1024,
            "train.epochs": 300,
            "schedule.warmup_epochs": 10,
            "schedule.min_lr": 1e-6,
        },
        [{**v, "scale": [0.4, 1.0]} for v in BYOL_VIEWS] + [view(8, 96, [0.05, 0.4], 0.8, BYOL_JITTER, 0.2, 0.5)],
    ),
    "dino-resnet": (
        "DINO README, ResNet-50 command (--optimizer sgd --lr 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4 "
        "--global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14; lr x batch/256 in main_dino.py; 8 x 64)",
        0.06,
        {
            "optim.name": "sgd",
            "optim.weight_decay": 1e-4,
            "method.teacher_temperature": 0.04,
            "method.num_prototypes": 65536,
            "train.batch_size": 512,
            "train.epochs": 100,
        },
        [{**v, "scale": [0.14, 1.0]} for v in BYOL_VIEWS] + [view(8, 96, [0.05, 0.14], 0.8, BYOL_JITTER, 0.2, 0.5)],
    ),
    "amdim": (
        "AMDIM, arXiv:1906.00910 and Philip-Bachman/amdim-public: README ImageNet command (--ndf 192 --n_rkhs 1536 "
        "--n_depth 8 --batch_size 480 --tclip 20 --dataset IN128), train.py (Adam lr 2e-4), task_self_supervised.py "
        "(betas 0.8 / 0.999, wd 1e-5 on every parameter, 50 epochs, x0.2 at 30 and 45, warm-up over 500 updates), "
        "costs.py (score penalty 5e-2), datasets.py TransformsImageNet128 (crop 0.3-1, jitter 0.4/0.4/0.4/0.1 p 0.8, "
        "grey 0.25)",
        2e-4,
        AMDIM_VALUES
        | {
            "backbone.name": "amdim_128",
            "train.batch_size": 480,
            "train.epochs": 50,
            "schedule.milestones": [30, 45],
            "data.mean": [0.485, 0.456, 0.406],
        },
        [view(2, 128, [0.3, 1.0], 0.8, {**MOCO_JITTER, "hue": 0.1}, 0.25, 0.0)],
    ),
    "amdim-cifar": (
        "AMDIM, Philip-Bachman/amdim-public train.py defaults (ndf 128, n_rkhs 1024, n_depth 3, batch 200, lr 2e-4, "
        "tclip 20), task_self_supervised.py for CIFAR (300 epochs, x0.2 at 250 and 280), datasets.py TransformsC10 "
        "(normalisation, jitter 0.4/0.4/0.4/0.2 p 0.8, grey 0.25; its 4-pixel translation replaced by AMDIM's crop)",
        2e-4,
        AMDIM_VALUES
        | {
            "backbone.name": "amdim_32",
            "train.batch_size": 200,
            "train.epochs": 300,
            "schedule.milestones": [250, 280],
            "data.mean": [125.3 / 255, 123.0 / 255, 113.9 / 255],
            "data.std": [63.0 / 255, 62.1 / 255, 66.7 / 255],
        },
        [view(2, 32, [0.3, 1.0], 0.8, {**MOCO_JITTER, "hue": 0.2}, 0.25, 0.0)],
    ),
    "yadim": (
        "YADIM, Falcon & Cho 2020 (arXiv:2009.00104, Sec. 5) with the authors' lightning-bolts amdim_module.py "
        "(batch 200, Adam lr 2e-4, betas 0.8 / 0.999, wd 1e-5, no schedule, tclip 20); AMDIM's encoder and "
        "TransformsImageNet128 (crop 0.3-1, jitter 0.4/0.4/0.4/0.1 p 0.8, grey 0.25)",
        2e-4,
        YADIM_VALUES | {"backbone.name": "amdim_128", "data.mean": [0.485, 0.456, 0.406]},
        [view(2, 128, [0.3, 1.0], 0.8, {**MOCO_JITTER, "hue": 0.1}, 0.25, 0.0)],
    ),
    "yadim-cifar": (
        "YADIM, lightning-bolts amdim_module.py DATASET_CIFAR10 (batch 200, lr 2e-4), AMDIM's 32x32 encoder and "
        "TransformsC10 (jitter 0.4/0.4/0.4/0.2 p 0.8, grey 0.25; its translation replaced by AMDIM's crop)",
        2e-4,
        YADIM_VALUES | {"backbone.name": "amdim_32", "data.mean": [125.3 / 255, 123.0 / 255, 113.9 / 255]},
        [view(2, 32, [0.3, 1.0], 0.8, {**MOCO_JITTER, "hue": 0.2}, 0.25, 0.0)],
    ),
}


# CPC v2: the pseudocode of Appendix A.2 (target_dim 64, emb_scale 0.1, steps_to_ignore 2, steps_to_predict 3, 5
# PixelCNN-style residual blocks 256 wide), layer norm instead of BatchNorm, four directions, colour dropping and flips
# per patch (Sec. 4.1), a 7x7 grid of half-overlapping patches. The optimiser, its rate, the batch, the epochs and the
# crop scale are this recipe's own (the card pins them so a change is deliberate), not published values.
CARDS["cpcv2"] = (
    "CPC v2, Henaff et al. 2019, arXiv:1905.09272, Sec. 4.1 and Appendix A.2 (pseudocode); lr / batch / epochs / crop: "
    "ssl's choices",
    4e-4,
    {
        "method.grid": 7,
        "method.target_dim": 64,
        "method.emb_scale": 0.1,
        "method.context_dim": 256,
        "method.context_blocks": 5,
        "method.steps_to_ignore": 2,
        "method.steps_to_predict": 3,
        "method.directions": ["down", "up", "right", "left"],
        "method.patch_hflip_prob": 0.5,
        "method.patch_color_drop_prob": 1.0,
        "backbone.name": "resnet50",
        "backbone.kwargs": {"norm_layer": "groupnorm1"},
        "optim.name": "adamw",
        "train.batch_size": 512,
    },
    [{**view(1, 256, [0.2, 1.0], 0.0, SIMCLR_JITTER, 0.0, 0.0), "hflip_prob": 0.0}],
)


CARDS["cmc"] = (
    CMC_SOURCE,
    0.03,
    CMC_VALUES | {"backbone.name": "cmc_resnet50", "backbone.small_stem": False},
    [view(1, 224, [0.08, 1.0], 0.0, SIMCLR_JITTER, 0.0, 0.0)],
)
# no published CIFAR settings: the ImageNet recipe with a half-width ResNet-18 per view, its CIFAR stem, 0.2-1 crops
CARDS["cmc-cifar"] = (
    CMC_SOURCE + "; 32x32: ssl's cmc_resnet18 with the small stem and crops of 0.2-1",
    0.03,
    CMC_VALUES | {"backbone.name": "cmc_resnet18", "backbone.small_stem": True},
    [view(1, 32, [0.2, 1.0], 0.0, SIMCLR_JITTER, 0.0, 0.0)],
)


def resolve(recipe: Recipe, key: str) -> Any:
    value: Any = recipe
    for part in key.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def view_card(recipe: Recipe) -> list[dict[str, Any]]:
    fields = ("count", "size", "scale", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob", "hflip_prob")
    return [{**{f: getattr(v, f) for f in fields}, "jitter": v.jitter(), **randaugment_card(v)} for v in recipe.views]


def randaugment_card(v: ViewConfig) -> dict[str, Any]:
    if v.randaugment == "none":
        return {}
    values = (v.randaugment, v.randaugment_n, v.randaugment_m, v.randaugment_mstd, v.randaugment_prob)
    return {"randaugment": dict(zip(INFOMIN_RANDAUGMENT, values, strict=True))}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def card_errors(name: str, recipe: Recipe) -> list[str]:
    """Every value of ``recipe`` that differs from card ``name``, as readable lines."""
    _, peak_lr, values, views = CARDS[name]
    wrong = [
        f"{k}: {resolve(recipe, k)!r} (published {v!r})" for k, v in values.items() if not _same(resolve(recipe, k), v)
    ]
    lr = effective_lr(recipe.optim, recipe.train.batch_size)
    if not _same(lr, peak_lr):
        wrong.append(f"peak lr at batch {recipe.train.batch_size}: {lr!r} (published {peak_lr!r})")
    got_views = view_card(recipe)
    if not _same(got_views, views):
        wrong.append(f"views: {got_views!r} (published {views!r})")
    return wrong


@pytest.mark.parametrize("name", sorted(CARDS))
def test_recipe_matches_its_papers_card(name: str) -> None:
    wrong = card_errors(name, load_recipe(name))
    assert not wrong, f"{name} differs from {CARDS[name][0]}: " + "; ".join(wrong)


def test_a_wrong_value_fails_the_card() -> None:
    """The check itself: one value off (the old DINO ResNet lr, MoCo v3's old crops, ...) is caught."""
    cases = {
        "dino-resnet": ([("optim.lr", 0.0005)], "peak lr"),
        "mocov3": ([("views.*.scale", [0.08, 1.0])], "views"),
        "swav": ([("schedule.warmup_start", 0.0)], "schedule.warmup_start"),
        "invaspread": ([("schedule.factors", [0.1, 0.01, 0.001])], "schedule.factors"),
        "byol": ([("views.1.solarize_prob", 0.0)], "views"),
        "simclr": ([("method.proj_last_batchnorm", "affine")], "method.proj_last_batchnorm"),
        "simsiam": ([("optim.lr_scaling", "sqrt")], "peak lr"),
        "infomin": ([("views.*.randaugment_m", 9.0)], "views"),
        "amdim": ([("method.score_reg", 0.005)], "method.score_reg"),
        "yadim": ([("method.denominator", "negatives")], "method.denominator"),
        "cmc": ([("method.nce_k", 4096)], "method.nce_k"),
    }
    for name, (overrides, what) in cases.items():
        wrong = card_errors(name, load_recipe(name, overrides))
        assert len(wrong) == 1 and wrong[0].startswith(what), (name, wrong)


def test_infomin_cifar_is_mocov2_cifar_with_infomin_views() -> None:
    """The 32x32 variant keeps every mocov2-cifar setting and takes InfoMin's views (no blur at 32x32)."""
    infomin, mocov2 = load_recipe("infomin-cifar").to_dict(), load_recipe("mocov2-cifar").to_dict()
    assert {k for k in infomin if infomin[k] != mocov2[k]} == {"recipe", "views"}
    assert view_card(load_recipe("infomin-cifar")) == [
        view(2, 32, [0.2, 1.0], 0.8, SIMCLR_JITTER, 0.2, 0.0, randaugment=INFOMIN_RANDAUGMENT)
    ]
    # any recipe takes the preset by name: the same policy on simclr-cifar's own views
    simclr = load_recipe("simclr-cifar", ["views.*.randaugment=infomin"])
    assert randaugment_card(simclr.views[0]) == {"randaugment": INFOMIN_RANDAUGMENT}
