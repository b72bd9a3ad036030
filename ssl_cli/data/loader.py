"""Training data loading with reproducible augmentation.

The sampler hands out *global* sample ids, ``epoch * N + index``, in a permutation seeded by
``(seed, epoch)``; each sample's augmentation runs under a generator seeded by ``(seed, global id)``.
The views of an image are therefore a pure function of the seed, the epoch and the index: the same with
any number of workers, and the same after ``--resume`` as in an uninterrupted run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ssl_cli.data.images import ImageSet
from ssl_cli.signals import ignore_stop_signals


def mix_seed(*values: int) -> int:
    """A 63-bit hash of integers (splitmix64 steps), so neighbouring ids get unrelated seeds."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x >> 1


class EpochSampler(Sampler[int]):
    """Shuffles indices per epoch from ``(seed, epoch)`` and yields ``epoch * N + index``.

    With ``world_size`` W > 1 (one sampler per rank), the epoch's permutation is cut into global batches of
    W x ``batch_size`` and rank r takes the r-th slice of each: the ranks together see exactly the global
    batches one process with a W times larger batch would, in the same order, and every rank the same number
    of batches (the incomplete last global batch is dropped).

    ``set_epoch(epoch, skip_batches)`` starts the epoch after its first ``skip_batches`` batches of this rank: a
    run resumed from a mid-epoch checkpoint continues exactly where it stopped.
    """

    def __init__(self, num_samples: int, seed: int, batch_size: int = 1, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def epoch_length(self) -> int:
        """This rank's samples in a whole epoch (what is skipped included)."""
        if self.world_size == 1:
            return self.num_samples
        return self.num_samples // (self.batch_size * self.world_size) * self.batch_size

    def __len__(self) -> int:
        return max(0, self.epoch_length() - self.skip_batches * self.batch_size)

    def order(self) -> torch.Tensor:
        """This rank's sample indices (``0..N-1``) of the whole epoch, in order."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=g)
        if self.world_size > 1:
            b, w = self.batch_size, self.world_size
            order = order[: self.num_samples // (b * w) * b * w].view(-1, w, b)[:, self.rank].reshape(-1)
        return order

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * self.num_samples
        yield from (offset + i for i in self.order()[self.skip_batches * self.batch_size :].tolist())


class ViewDataset(Dataset):
    """Items are ``(views, label, index)``; augmentation is seeded per global sample id."""

    def __init__(self, images: ImageSet, transform: Callable[[torch.Tensor], list[torch.Tensor]], seed: int):
        self.images = images
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, global_id: int) -> tuple[list[torch.Tensor], int, int]:
        index = global_id % len(self.images)
        image = self.images.load(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, global_id, 1))
            views = self.transform(image)
        return views, int(self.images.labels[index]), index


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's share), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 2


def resolve_workers(num_workers: int | str) -> int:
    """``data.num_workers``: ``auto`` is this process's share of the cores (divided among torchrun's processes on this
    machine, ``LOCAL_WORLD_SIZE``) less one for the training step itself, between 1 and 8."""
    if num_workers == "auto":
        processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
        return max(1, min(8, available_cores() // processes - 1))
    return int(num_workers)


def train_loader(
    dataset: ViewDataset, batch_size: int, num_workers: int, seed: int, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """Batches of ``batch_size`` (per rank) in the order of :class:`EpochSampler`."""
    sampler = EpochSampler(len(dataset), seed, batch_size, rank, world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=True,  # equal batches: BatchNorm statistics and queue updates stay regular
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        # the loader's own generator: drawing worker seeds from the global RNG would make the global
        # stream (used e.g. by shuffle-BN) depend on when workers start, which differs after --resume
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=ignore_stop_signals,  # Ctrl-C / SIGTERM / SIGUSR1 are the main process's to handle
    )
