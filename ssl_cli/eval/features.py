"""Feature extraction: a frozen backbone over an image set, once, in eval mode (optionally through the cache)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ssl_cli.data import ImageSet
from ssl_cli.data.loader import resolve_workers

if TYPE_CHECKING:
    from ssl_cli.eval.cache import FeatureCache


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
    """Returns features N x D (float32, CPU) and labels N.

    The batches are written into one tensor allocated after the first batch, so a large set never holds its
    features twice (a list of batches plus their concatenation).
    """
    model.eval()
    try:
        total = len(loader.dataset)
    except TypeError:  # an iterable dataset: no length to allocate for
        batches = [(model(x.to(device)).float().cpu(), y) for x, y in loader]
        if progress:
            for _, y in batches:
                progress(len(y))
        return torch.cat([f for f, _ in batches]), torch.cat([y for _, y in batches])
    feats: torch.Tensor | None = None
    labels = torch.empty(total, dtype=torch.int64)
    done = 0
    for x, y in loader:
        f = model(x.to(device)).float().cpu()
        if feats is None:
            feats = torch.empty(total, *f.shape[1:], dtype=torch.float32)
        feats[done : done + len(y)] = f
        labels[done : done + len(y)] = y
        done += len(y)
        if progress:
            progress(len(y))
    if feats is None:
        raise ValueError("no images to extract features from")
    return feats[:done], labels[:done]


def features_of(
    model: nn.Module,
    images: ImageSet,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int,
    num_workers: int | str = "auto",
    progress: Callable[[int], None] | None = None,
    cache: FeatureCache | None = None,
    model_id: dict[str, Any] | None = None,
    images_id: str | None = None,
    name: str = "images",
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Features and labels of ``images`` through ``model`` with the evaluation preprocessing; ``True`` if cached.

    With a ``cache`` (and the ``model_id`` that names the weights), the features are read from the cache when
    an entry for (model, preprocessing, image set) exists, so the model does not run; otherwise they are
    extracted and stored. ``images_id`` is the set's :func:`~ssl_cli.eval.cache.images_fingerprint` when the
    caller computed it before decoding the images (a decoded folder no longer knows its files).
    """
    from ssl_cli.augment import eval_transform
    from ssl_cli.eval.cache import feature_key, images_fingerprint

    key = None
    if cache is not None:
        if model_id is None:
            raise ValueError("a feature cache needs the model_id of the weights")
        pre = {"size": size, "mean": mean, "std": std}
        key = feature_key(model_id, pre, images_id or images_fingerprint(images))
        cached = cache.load(key, images.labels)
        if cached is not None:
            if progress:
                progress(len(images))
            cache.note(f"features: cached ({name}: {cached.shape[0]} x {cached.shape[1]}, {cache.path(key)})")
            return cached, images.labels.to(torch.int64).clone(), True
    # Decode in this process first (threads; a broken file is one clear error), unless the set is too big to keep.
    images = images.cached("auto")
    loader = image_loader(images, eval_transform(size, mean, std), batch_size, num_workers)
    feats, labels = extract_features(model, loader, device, progress)
    if cache is not None and key is not None:
        info = {"name": name, "count": int(feats.shape[0]), "dim": int(feats.shape[1]), "model": model_id}
        written = cache.save(key, feats, labels, info)
        if written is not None:
            cache.note(f"features: extracted ({name}: {feats.shape[0]} x {feats.shape[1]}), cached in {written}")
    return feats, labels, False
