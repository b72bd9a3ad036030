"""Views per second: the batched view pipeline against the per-sample torchvision one.

Random uint8 32x32 images through the ``simclr-cifar`` view (crop, flip, jitter 0.5, grayscale; no blur), one
batch at a time for ``BatchedView`` and one image at a time for ``view_transform``.

    python benchmarks/augment_throughput.py
    python benchmarks/augment_throughput.py --threads 2 --batch 512 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from ssl_cli.augment.batched import BatchedView
from ssl_cli.augment.views import view_transform
from ssl_cli.config import load_recipe


def rate(fn, views: int, seconds: float) -> float:
    """Views per second of ``fn`` (``views`` views a call), repeating it for at least ``seconds``."""
    fn()  # warm-up
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls < 2:
        fn()
        calls += 1
    return calls * views / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32, help="side of the random input images")
    parser.add_argument("--recipe", default="simclr-cifar")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    view, mean, std = recipe.views[0], recipe.data.mean, recipe.data.std
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=g)

    batched = BatchedView(view, mean, std)
    on_device = images.to(args.device)
    sync = torch.cuda.synchronize if on_device.is_cuda else (lambda: None)

    def run_batched() -> None:
        batched(on_device, g)
        sync()

    per_sample = view_transform(view, mean, std)

    def run_per_sample() -> None:
        for image in images:
            per_sample(image)

    fast = rate(run_batched, args.batch, args.seconds)
    slow = rate(run_per_sample, args.batch, args.seconds)
    print(f"{args.recipe} view {view.size}px from {args.size}px, batch {args.batch}, {args.threads} thread(s)")
    print(f"batched ({args.device}):   {fast:10.0f} views/s")
    print(f"per-sample (cpu): {slow:10.0f} views/s")
    print(f"speed-up:         {fast / slow:10.1f}x")


if __name__ == "__main__":
    main()
