"""The peer side of the equal-budget comparison: SimCLR or MoCo v2 trained with lightly, as lightly documents them.

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
import torchvision
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead, SimCLRProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import MoCoV2Transform, SimCLRTransform
from safetensors.torch import save_file
from torch import nn


class Peer(nn.Module):
    def __init__(self, method: str) -> None:
        super().__init__()
        self.method = method
        self.backbone = timm.create_model("resnet18", pretrained=False, num_classes=0)
        if method == "simclr":
            self.head = SimCLRProjectionHead(512, 512, 128)
            self.criterion = NTXentLoss()
        else:
            self.head = MoCoProjectionHead(512, 512, 128)
            self.criterion = NTXentLoss(temperature=0.1, memory_bank_size=(4096, 128))
            self.key_backbone = copy.deepcopy(self.backbone)
            self.key_head = copy.deepcopy(self.head)
            deactivate_requires_grad(self.key_backbone)
            deactivate_requires_grad(self.key_head)

    def loss(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        if self.method == "simclr":
            return self.criterion(self.head(self.backbone(x0)), self.head(self.backbone(x1)))
        update_momentum(self.backbone, self.key_backbone, 0.99)
        update_momentum(self.head, self.key_head, 0.99)
        q0, q1 = self.head(self.backbone(x0)), self.head(self.backbone(x1))
        with torch.no_grad():
            k0, k1 = self.key_head(self.key_backbone(x0)), self.key_head(self.key_backbone(x1))
        return 0.5 * (self.criterion(q0, k1) + self.criterion(q1, k0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=["simclr", "mocov2"], required=True)
    p.add_argument("--train", required=True, help="ImageFolder with the training images")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    p.add_argument("--warmup-steps", type=int, default=3, help="steps not timed for --steps")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    if a.method == "simclr":
        transform = SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)
    else:
        transform = MoCoV2Transform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)
    data = torchvision.datasets.ImageFolder(a.train, transform=transform)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=a.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=a.workers,
        persistent_workers=a.workers > 0,
    )
    model = Peer(a.method)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06 * a.batch_size / 128, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, a.epochs)
    steps, timed_images, loss = 0, 0, torch.tensor(0.0)
    start = time.perf_counter()
    timed_start = start
    for _epoch in range(a.epochs):
        model.train()
        for (x0, x1), _ in loader:
            loss = model.loss(x0, x1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if steps == a.warmup_steps:
                timed_start, timed_images = time.perf_counter(), 0
            else:
                timed_images += x0.shape[0]
            if a.steps and steps >= a.steps + a.warmup_steps:
                break
        scheduler.step()
        if a.steps and steps >= a.steps + a.warmup_steps:
            break
    wall = time.perf_counter() - start
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.backbone.state_dict().items()}
    save_file(state, str(out / "backbone.safetensors"))
    result = {
        "library": "lightly",
        "method": a.method,
        "epochs": a.epochs,
        "batch_size": a.batch_size,
        "workers": a.workers,
        "steps": steps,
        "wall_s": wall,
        "images_per_second": timed_images / (time.perf_counter() - timed_start),
        "loss": float(loss.detach()),
        "torch_threads": torch.get_num_threads(),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
