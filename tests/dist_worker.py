"""One or two optimizer steps of a method on one rank's share of a fixed global batch (tests/train/test_distributed.py).

Runs in the test process (one process, the whole batch) and in spawned gloo ranks (each its slice of the batch,
DistributedDataParallel, BatchNorm over the global batch); the test compares the two.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from conftest import TINY
from ssl_cli.config import load_recipe
from ssl_cli.distributed import all_reduce_mean, data_parallel
from ssl_cli.train.optim import build_optimizer, clip_gradients
from ssl_cli.train.pretrain import build_method
from ssl_cli.train.sync_batchnorm import convert_global_batchnorm

GLOBAL_BATCH = 16
STEPS = 2

CMC_TINY = [("backbone.name", "cmc_test_resnet"), ("backbone.small_stem", False)]

# name: (recipe, overrides) -- settings whose step is deterministic (no random noise samples)
CASES: dict[str, tuple[str, list]] = {
    "simclr": ("simclr", []),
    # the online linear classifier (ssl pretrain --val): its gradient averaged over the ranks like the method's
    "simclr-online": ("simclr", []),
    # tau 0.2, not MoCo v1's 0.07: at 0.07 the second step is ill-conditioned on this random data (weight decay 1e-5
    # instead of 1e-4, or the 4e-7 that the all-reduce moves the first step by, change its weights by 1e-3)
    "mocov1": ("mocov1", [("method.queue_size", 64), ("method.shuffle_bn_splits", 1), ("method.temperature", 0.2)]),
    "mocov2": ("mocov2", [("method.queue_size", 64), ("method.shuffle_bn_splits", 1)]),
    "simclrv2-queue": ("simclrv2", [("method.queue_size", 64)]),
    "byol": ("byol", [("method.proj_hidden_dim", 64), ("method.pred_hidden_dim", 64)]),
    "simsiam": ("simsiam", [("method.proj_hidden_dim", 64), ("method.pred_hidden_dim", 16)]),
    "barlowtwins": ("barlowtwins", [("method.proj_hidden_dim", 64), ("method.proj_output_dim", 64)]),
    # the paper's symmetric gradient: with the official detach_keys = true the two runs agree after one step, but
    # its second step is ill-conditioned on this random data (3e-7 of parameter noise moves the gradient by 1%)
    "invaspread": ("invaspread", [("method.detach_keys", False)]),
    "instdisc-softmax": ("instdisc", [("method.loss", "softmax")]),
    # in-batch keys gathered from every rank, momentum encoder
    "mocov3": ("mocov3", [("method.proj_hidden_dim", 32), ("method.pred_hidden_dim", 32), ("method.temperature", 0.2)]),
    # Sinkhorn's sums all-reduced; a queue that is full from the second step (the queue joins Sinkhorn)
    "swav": (
        "swav-cifar",
        [("backbone.small_stem", False), ("method.proj_hidden_dim", 32), ("method.num_prototypes", 20)]
        + [("method.queue_size", 16), ("method.queue_start_epoch", 0), ("method.freeze_prototypes_epochs", 0.0)],
    ),
    # DINO: the centre is the mean of every rank's teacher outputs; a third (student-only) view
    "dino": (
        "dino-resnet-cifar",
        [("backbone.small_stem", False), ("method.proj_hidden_dim", 32), ("method.num_prototypes", 20)]
        + [("method.freeze_last_layer_epochs", 0.0), ("method.momentum", 0.9), ("optim.clip_grad", 1.0)]
        + [("views", [{"count": 2, "size": 32}, {"count": 1, "size": 32}])],
    ),
    # DeepCluster v2: memory fill and writes with every rank's rows, the same k-means on every rank; a local view.
    # LARS without the recipe's LARC clip mode: with it, the second step on this random data magnified the ranks' 1e-7
    # rounding differences to 7e-5 in conv1 on one machine (AMD EPYC, torch 2.14.1), also before any change of ours
    "deepclusterv2": (
        "deepclusterv2-cifar",
        [("backbone.small_stem", False), ("method.proj_hidden_dim", 32), ("method.num_prototypes", [6, 5, 4])]
        + [("views", [{"count": 2, "size": 32}, {"count": 1, "size": 32}]), ("optim.clip_lr", False)],
    ),
    # AMDIM: targets gathered with their gradient, the 5->5 source locations drawn for the global batch, its encoder's
    # final BatchNorm and the heads' over the global batch. SGD, not the recipe's Adam: the heads' shortcut biases
    # feed a BatchNorm, so their true gradient is 0 and Adam's first step (g / (|g| + eps)) turns the ranks' 1e-9
    # rounding noise in it into updates of 1e-2
    "amdim": (
        "amdim-cifar",
        [("backbone.name", "amdim_32"), ("backbone.kwargs.ndf", 8), ("backbone.kwargs.n_rkhs", 32)]
        + [("optim.name", "sgd")],
    ),
    # YADIM: the other view's last maps gathered with their gradient (the negatives are the global batch's other
    # images), AMDIM's encoder's final BatchNorm over the global batch; SGD for the reason given for AMDIM
    "yadim": (
        "yadim-cifar",
        [("backbone.name", "amdim_32"), ("backbone.kwargs.ndf", 8), ("backbone.kwargs.n_rkhs", 32)]
        + [("backbone.kwargs.n_depth", 1), ("optim.name", "sgd")],
    ),
    # CMC: the noise indices drawn for the global batch, each direction's Z from every rank's first batch, both
    # banks written with every rank's rows after the step; the per-view networks' BatchNorm over the global batch. Tau
    # 0.2, not the recipe's 0.07: at 0.07 the two runs agree after one step, but the second moves the L network's stem
    # by up to 2e-4 from the ranks' 1e-7 rounding differences (as MoCo v1's case above)
    "cmc": ("cmc-cifar", [*CMC_TINY, ("method.temperature", 0.2), ("method.nce_k", 16)]),
    # CMC with in-batch negatives: the other view's embeddings of every rank gathered with their gradient. Tau 0.5: at
    # 0.07 and 0.2 the second step moves a stem by 1e-3 and 6e-4 (the first step agrees to 2e-6)
    "cmc-infonce": ("cmc-cifar", [*CMC_TINY, ("method.temperature", 0.5), ("method.loss", "infonce")]),
}


# CPC v2: every patch through the encoder alone (GroupNorm, no batch statistics), InfoNCE against the targets of every
# rank's images, gathered with their gradient; each patch's flip and channel drop drawn for the global batch from
# (seed, step), so each rank augments its images as the single process does. SGD, not the recipe's AdamW (Adam's first
# step would turn the ranks' rounding noise into whole updates)
CASES["cpcv2"] = ("cpcv2", [("method.context_dim", 16), ("optim.name", "sgd")])


def global_batch(num_views: int, step: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    views = [torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g) for _ in range(num_views)]
    index = torch.randperm(4 * GLOBAL_BATCH, generator=g)[:GLOBAL_BATCH]
    return views, index


def run_case(case: str, rank: int = 0, world: int = 1) -> dict:
    """Losses (mean over ranks) and the final state dict after ``STEPS`` steps."""
    name, overrides = CASES[case]
    torch.manual_seed(0)
    recipe = load_recipe(name, [*TINY, *overrides])
    method = build_method(recipe)
    method.bind_data(4 * GLOBAL_BATCH, None)
    groups = method.param_groups()
    if case.endswith("-online"):
        method.attach_online_classifier(torch.arange(4 * GLOBAL_BATCH) % 3, 3, torch.Generator().manual_seed(0))
        groups.append({"params": list(method.online_classifier.parameters()), "weight_decay": 0.0})
    if world > 1:
        method = convert_global_batchnorm(method)
    optimizer = build_optimizer(groups, recipe.optim, GLOBAL_BATCH)
    for group in optimizer.param_groups:
        group["lr"] = 0.05 * group.get("lr_scale", 1.0)
    model = data_parallel(method, torch.device("cpu")) if world > 1 else method
    share = GLOBAL_BATCH // world

    def batches():  # this rank's share of the steps' batches: the pass of the epoch hook (DeepCluster v2's fill)
        for step in range(STEPS):
            views, index = global_batch(recipe.num_views, step)
            yield [v[rank * share : (rank + 1) * share] for v in views], index[rank * share : (rank + 1) * share]

    method.epoch_start(0, batches)
    losses = []
    for step in range(STEPS):
        views, index = global_batch(recipe.num_views, step)
        mine = slice(rank * share, (rank + 1) * share)
        out = model([v[mine] for v in views], step, index[mine])
        optimizer.zero_grad()
        (out.loss if out.monitor_loss is None else out.loss + out.monitor_loss).backward()
        if recipe.optim.clip_grad:
            clip_gradients(method.parameters(), recipe.optim.clip_grad)
        method.before_optimizer_step(step, 10)
        optimizer.step()
        method.after_optimizer_step(step, 10)
        losses.append(float(all_reduce_mean(out.loss.detach())))
    return {"losses": losses, "state": {k: v.detach().clone() for k, v in method.state_dict().items()}}


def worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {case: run_case(case, rank, world) for case in CASES}
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()
