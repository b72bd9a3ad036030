"""Training batches augmented as whole tensors (``data.augment = "batch"``), without loader workers, or cropped per
image in workers and finished as whole tensors (``"crop"``).

The images stay decoded in memory as one uint8 N x 3 x H x W tensor; each step takes the batch's images,
moves them to the training device and augments them there with ``ssl_cli.augment.batched`` (on the GPU when
there is one). No per-sample Python runs in the hot path, and no worker process competes with the training
step for the CPU cores.

Order and randomness are reproducible: the batches follow :class:`EpochSampler` (the same global batches as the
per-sample loader), and the augmentation parameters of global batch g of epoch e are drawn from a generator
seeded by (seed, e, g) for the whole global batch, of which each process applies its slice. A resumed run, or a
run on another number of processes, therefore sees the same views. (They are not the per-sample pipeline's
views: the two paths draw from different random streams, with the same distributions.)

``crop`` is for images that cannot stay in memory at one size (ImageNet-like folders): the loader workers decode each
image and run only the random resized crop and flip (torchvision, seeded per image as in the per-sample path), so
what crosses to the training process is uint8 at the view's size; the rest of the chain (jitter, grey, blur, solarize,
normalise) runs on the device in whole batches, its parameters drawn per global batch like ``batch``'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from ssl_cli.augment.batched import BatchedMultiView
from ssl_cli.augment.views import CropMultiView
from ssl_cli.config.schema import ViewConfig
from ssl_cli.data.images import ImageSet
from ssl_cli.data.loader import EpochSampler, ViewDataset, mix_seed, train_loader
from ssl_cli.errors import DataError


class AugmentChoice(NamedTuple):
    """The augmentation path a run takes (``data.augment`` resolved against its images) and why."""

    path: str
    """``batch`` (whole batches on the training device), ``crop`` (crops per image in loader workers, the rest in
    whole batches on the device) or ``sample`` (the whole chain per image in loader workers)."""
    reason: str


def batch_obstacle(images: ImageSet) -> str | None:
    """Why ``images`` cannot take whole-batch augmentation (None: they can, decoded in memory at one size)."""
    if isinstance(images.images, torch.Tensor):
        return None
    return "are not decoded in memory (data.cache)" if images.images is None else "differ in size"


def choose_augment(setting: str, images: ImageSet) -> AugmentChoice:
    """Resolve ``data.augment`` (``auto`` / ``batch`` / ``crop`` / ``sample``) for ``images``.

    ``auto`` takes the whole-batch path whenever it can: every image decoded in memory at one size (CIFAR- and
    STL-like sets, folders of same-size images under the memory limit, the demo data); else ``crop``, whose data path
    is faster than ``sample``'s also on the CPU (224 px views, 2 cores, 1 worker: 147 against 105 images/s)."""
    obstacle = batch_obstacle(images)
    if setting == "batch" and obstacle is not None:
        raise DataError(
            f"data.augment: 'batch' needs every image decoded in memory at one size, but the images of "
            f"{images.name} {obstacle}; use data.augment = 'auto', 'crop' or 'sample' (or data.cache = 'memory')"
        )
    if setting != "auto":
        return AugmentChoice(setting, f"data.augment = '{setting}'")
    if obstacle is None:
        _, _, height, width = images.images.shape
        reason = f"auto: the {len(images):,} images of {images.name} are in memory at {height}x{width}"
        return AugmentChoice("batch", reason)
    return AugmentChoice("crop", f"auto: the images of {images.name} {obstacle}")


def staged_pixels(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Where each step's batch is cut from the cached images: on a CUDA ``device`` itself when they take at most a
    quarter of its memory (CIFAR-10's 50,000 images are 150 MB), so no batch crosses the bus and the step never waits
    for a copy; else where they are."""
    if device.type != "cuda":
        return pixels
    if pixels.numel() * pixels.element_size() > torch.cuda.get_device_properties(device).total_memory // 4:
        return pixels
    return pixels.to(device)


class BatchedEpochs:
    """Iterable like the per-sample loader: ``(views, labels, index)`` per step, ``sampler.set_epoch(epoch)``."""

    def __init__(
        self,
        images: ImageSet,
        views: Sequence[ViewConfig],
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        choose_augment("batch", images)  # one clear error where the images cannot take it
        self.pixels = staged_pixels(images.images, device)
        self.labels = images.labels
        self.transform = BatchedMultiView(views, mean, std)
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.rank, self.world_size = rank, world_size
        self.sampler = EpochSampler(len(images), seed, batch_size, rank, world_size)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        order = self.sampler.order()
        total = self.batch_size * self.world_size
        for g in range(self.sampler.skip_batches, self.sampler.epoch_length() // self.batch_size):
            index = order[g * self.batch_size : (g + 1) * self.batch_size]
            images = self.pixels[index.to(self.pixels.device)].to(self.device, non_blocking=True)
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.sampler.epoch, g, 2))
            views = self.transform.share(images, generator, total, self.rank * self.batch_size)
            yield views, self.labels[index], index


class CroppedEpochs:
    """``data.augment = "crop"``: like the per-sample loader (``(views, labels, index)`` per step on ``device``,
    ``sampler.set_epoch``), with only crop + flip in the ``num_workers`` loader workers and the rest of each view's
    chain on ``device`` in whole batches."""

    def __init__(
        self,
        images: ImageSet,
        views: Sequence[ViewConfig],
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        seed: int,
        device: torch.device,
        num_workers: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.loader = train_loader(
            ViewDataset(images, CropMultiView(views), seed), batch_size, num_workers, seed, rank, world_size
        )
        self.sampler = self.loader.sampler
        self.transform = BatchedMultiView(views, mean, std)
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        total = self.batch_size * self.world_size
        for g, (crops, labels, index) in enumerate(self.loader, start=self.sampler.skip_batches):
            crops = [c.to(self.device, non_blocking=True) for c in crops]  # uint8: a quarter of float's bytes
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.sampler.epoch, g, 3))
            yield self.transform.finish_share(crops, generator, total, self.rank * self.batch_size), labels, index
