"""Feature extraction: a frozen backbone over a labeled image set, once, in eval mode."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ssl_cli.data import ImageSet
from ssl_cli.data.loader import resolve_workers


class _Transformed(Dataset):
    def __init__(self, images: ImageSet, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images.load(i)), int(self.images.labels[i])


def image_loader(
    images: ImageSet,
    transform,
    batch_size: int,
    num_workers: int | str = "auto",
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    return DataLoader(
        _Transformed(images, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=resolve_workers(num_workers),
        generator=torch.Generator().manual_seed(seed),
    )


@torch.no_grad()
def extract_features(
    model: nn.Module, loader: DataLoader, device: torch.device, progress: Callable[[int], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns features N x D (float32, CPU) and labels N."""
    model.eval()
    feats, labels = [], []
    for x, y in loader:
        feats.append(model(x.to(device)).float().cpu())
        labels.append(y)
        if progress:
            progress(len(y))
    return torch.cat(feats), torch.cat(labels)
