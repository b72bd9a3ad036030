"""The peer side of the comparisons with lightly: SimCLR / MoCo v2 trained as lightly documents them, and the
BYOL / SwAV / DINO steps of ``ssl bench``'s rows for throughput.

Runs in its own virtual environment with lightly and timm (not a dependency of ``ssl``):

    python -m venv ~/lightly-venv && ~/lightly-venv/bin/pip install lightly timm safetensors
    ~/lightly-venv/bin/python benchmarks/lightly_peer.py --method simclr --train ~/data/train --out /tmp/peer/simclr

The backbone is timm's ``resnet18`` with its plain stem (``num_classes=0``, 512-d pooled features), the same
network ``ssl`` trains in the comparison. The rest follows lightly's CIFAR-10 benchmark
(docs/source/getting_started/benchmarks/cifar10_benchmark.py): its transforms (``SimCLRTransform`` at 32 px with
colour-jitter strength 0.5 and no blur; MoCo v2 the same with its own ``MoCoV2Transform`` defaults otherwise) in
DataLoader worker processes, projection heads 512 -> 512 -> 128, SGD lr 0.06 x batch/128 with momentum 0.9 and
weight decay 5e-4 on a per-epoch cosine, NT-Xent at its default temperature 0.5 for SimCLR, and for MoCo a memory
bank of 4096 keys at temperature 0.1 with a key encoder at momentum 0.99, symmetric loss.

BYOL, SwAV and DINO (``--steps`` only: the throughput rows beside ``ssl bench``) use lightly's heads and losses at
the sizes of the ``ssl`` recipes they are compared with: BYOL 512 -> 4096 -> 256 heads with a momentum target
(``BYOLTransform`` at 32 px without blur), SwAV a 512 -> 2048 -> 128 projector and 3000 prototypes over
``SwaVTransform`` crops of 2 x 32 + 6 x 16 px (each crop through the backbone on its own, as lightly's example),
DINO ``DINOProjectionHead`` 512 -> 2048 -> 256 -> 4096 with an EMA teacher on ``DINOTransform`` crops of 2 x 32 +
8 x 16 px.

``--device cuda`` runs the step on the GPU under bf16 autocast (what ``ssl`` runs there by default), the loader in
pinned memory; ``--small-stem`` swaps in the CIFAR stem of ``ssl``'s ``-cifar`` recipes (3x3 stride-1 convolution, no
max-pool); ``--backbone`` another timm model (``benchmarks/gpu_check.py --dry-run`` uses timm's test ResNet).

Writes ``OUT/backbone.safetensors`` (timm's keys) and ``OUT/result.json`` (wall time, images/s over the training
steps, final loss); ``--steps N`` stops after N steps (a throughput measurement, like ``ssl bench``).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
import torchvision
from lightly.loss import DINOLoss, NegativeCosineSimilarity, NTXentLoss, SwaVLoss
from lightly.models.modules import (
    BYOLPredictionHead,
    BYOLProjectionHead,
    DINOProjectionHead,
    MoCoProjectionHead,
    SimCLRProjectionHead,
    SwaVProjectionHead,
    SwaVPrototypes,
)
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import (
    BYOLTransform,
    BYOLView1Transform,
    BYOLView2Transform,
    DINOTransform,
    MoCoV2Transform,
    SimCLRTransform,
    SwaVTransform,
)
from safetensors.torch import save_file
from torch import nn


class Peer(nn.Module):
    def __init__(self, method: str, backbone: str = "resnet18", small_stem: bool = False) -> None:
        super().__init__()
        self.method = method
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0)
        if small_stem:  # the CIFAR stem of ssl's -cifar recipes: a 3x3 stride-1 first convolution, no max-pool
            width = self.backbone.conv1.out_channels
            self.backbone.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.backbone.maxpool = nn.Identity()
        dim = self.backbone.num_features
        if method == "simclr":
            self.head = SimCLRProjectionHead(dim, 512, 128)
            self.criterion = NTXentLoss()
            return
        if method == "mocov2":
            self.head = MoCoProjectionHead(dim, 512, 128)
            self.criterion = NTXentLoss(temperature=0.1, memory_bank_size=(4096, 128))
        elif method == "byol":
            self.head = BYOLProjectionHead(dim, 4096, 256)
            self.predictor = BYOLPredictionHead(256, 4096, 256)
            self.criterion = NegativeCosineSimilarity()
        elif method == "swav":
            self.head = SwaVProjectionHead(dim, 2048, 128)
            self.prototypes = SwaVPrototypes(128, 3000, n_steps_frozen_prototypes=0)
            self.criterion = SwaVLoss()
            return
        else:  # dino
            self.head = DINOProjectionHead(dim, 2048, 256, 4096, freeze_last_layer=1)
            self.criterion = DINOLoss(output_dim=4096, warmup_teacher_temp_epochs=5)
        self.key_backbone = copy.deepcopy(self.backbone)
        # lightly's DINO example builds the teacher head anew (its weight-normalised layer cannot be deep-copied)
        self.key_head = DINOProjectionHead(dim, 2048, 256, 4096) if method == "dino" else copy.deepcopy(self.head)
        deactivate_requires_grad(self.key_backbone)
        deactivate_requires_grad(self.key_head)

    def loss(self, views: list[torch.Tensor], epoch: int) -> torch.Tensor:
        if self.method == "simclr":
            return self.criterion(self.head(self.backbone(views[0])), self.head(self.backbone(views[1])))
        if self.method == "swav":
            self.prototypes.normalize()
            crops = [self.prototypes(F.normalize(self.head(self.backbone(x)), dim=1)) for x in views]
            return self.criterion(crops[:2], crops[2:])
        update_momentum(self.backbone, self.key_backbone, 0.99)
        update_momentum(self.head, self.key_head, 0.99)
        if self.method == "dino":
            with torch.no_grad():
                teacher = [self.key_head(self.key_backbone(x)) for x in views[:2]]
            student = [self.head(self.backbone(x)) for x in views]
            return self.criterion(teacher, student, epoch=epoch)
        q0, q1 = self.head(self.backbone(views[0])), self.head(self.backbone(views[1]))
        with torch.no_grad():
            k0, k1 = self.key_head(self.key_backbone(views[0])), self.key_head(self.key_backbone(views[1]))
        if self.method == "byol":
            return 0.5 * (self.criterion(self.predictor(q0), k1) + self.criterion(self.predictor(q1), k0))
        return 0.5 * (self.criterion(q0, k1) + self.criterion(q1, k0))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def transform(method: str):
    if method == "simclr":
        return SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)
    if method == "mocov2":
        return MoCoV2Transform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)
    if method == "byol":
        return BYOLTransform(BYOLView1Transform(input_size=32, gaussian_blur=0.0), BYOLView2Transform(input_size=32))
    if method == "swav":
        return SwaVTransform(crop_sizes=(32, 16), crop_counts=(2, 6))
    return DINOTransform(global_crop_size=32, local_crop_size=16, n_local_views=8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=["simclr", "mocov2", "byol", "swav", "dino"], required=True)
    p.add_argument("--train", required=True, help="ImageFolder with the training images")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    p.add_argument("--warmup-steps", type=int, default=3, help="steps not timed for --steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default="resnet18", help="timm model name")
    p.add_argument("--small-stem", action="store_true", help="the CIFAR stem (3x3 stride-1 conv, no max-pool)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA: bf16 autocast, as ssl's default there)")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    data = torchvision.datasets.ImageFolder(a.train, transform=transform(a.method))
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=a.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=a.workers,
        persistent_workers=a.workers > 0,
        pin_memory=device.type == "cuda",
    )
    model = Peer(a.method, a.backbone, a.small_stem).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06 * a.batch_size / 128, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, a.epochs)
    steps, timed_images, loss = 0, 0, torch.tensor(0.0)
    start = time.perf_counter()
    timed_start = start
    for epoch in range(a.epochs):
        model.train()
        for views, _ in loader:
            views = [v.to(device, non_blocking=True) for v in views]
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = model.loss(views, epoch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if steps == a.warmup_steps:
                sync(device)
                timed_start, timed_images = time.perf_counter(), 0
            else:
                timed_images += views[0].shape[0]
            if a.steps and steps >= a.steps + a.warmup_steps:
                break
        scheduler.step()
        if a.steps and steps >= a.steps + a.warmup_steps:
            break
    sync(device)
    wall, timed_seconds = time.perf_counter() - start, time.perf_counter() - timed_start
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in model.backbone.state_dict().items()}
    save_file(state, str(out / "backbone.safetensors"))
    result = {
        "library": "lightly",
        "method": a.method,
        "epochs": a.epochs,
        "batch_size": a.batch_size,
        "workers": a.workers,
        "steps": steps,
        "wall_s": wall,
        "images_per_second": timed_images / timed_seconds,
        "loss": float(loss.detach()),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "small_stem": a.small_stem,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
