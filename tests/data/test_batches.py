"""Whole-batch augmentation in training (``data.augment = "batch"``): order, slices, reproducibility, errors."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_one_line_error
from ssl_cli.augment.views import CropMultiView
from ssl_cli.config import load_recipe
from ssl_cli.data.batches import BatchedEpochs, CroppedEpochs, choose_augment
from ssl_cli.data.images import ImageSet
from ssl_cli.data.loader import EpochSampler, mix_seed
from ssl_cli.errors import DataError

VIEWS = load_recipe("simclr-cifar").views


def image_set(n: int = 40, size: int = 16) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return ImageSet("random", torch.arange(n) % 4, ["a", "b", "c", "d"], images=pixels)


def epochs(images: ImageSet, batch: int, rank: int = 0, world: int = 1, seed: int = 3) -> BatchedEpochs:
    return BatchedEpochs(images, VIEWS, [0.5] * 3, [0.25] * 3, batch, seed, torch.device("cpu"), rank, world)


def test_batches_follow_the_epoch_sampler_and_views_have_the_view_size() -> None:
    images = image_set()
    source = epochs(images, batch=8)
    source.sampler.set_epoch(2)
    batches = list(source)
    assert len(batches) == len(source) == 5
    sampler = EpochSampler(40, 3)
    sampler.set_epoch(2)
    order = torch.tensor(list(sampler)) % 40
    for g, (views, labels, index) in enumerate(batches):
        assert torch.equal(index, order[g * 8 : (g + 1) * 8])
        assert torch.equal(labels, images.labels[index])
        assert len(views) == 2 and all(v.shape == (8, 3, 32, 32) and v.dtype == torch.float32 for v in views)
        assert not torch.equal(views[0], views[1])  # two independent views


def test_two_processes_see_the_views_of_one_process_with_the_global_batch() -> None:
    images = image_set()
    one = epochs(images, batch=8)
    halves = [epochs(images, batch=4, rank=r, world=2) for r in range(2)]
    for s in [one, *halves]:
        s.sampler.set_epoch(1)
    for (views, _, index), *parts in zip(one, *halves, strict=True):
        assert torch.equal(index, torch.cat([p[2] for p in parts]))
        for v, view in enumerate(views):
            torch.testing.assert_close(view, torch.cat([p[0][v] for p in parts]))


def test_same_seed_and_epoch_give_the_same_views_another_epoch_others() -> None:
    images = image_set()

    def first(epoch: int) -> torch.Tensor:
        s = epochs(images, batch=8)
        s.sampler.set_epoch(epoch)
        return next(iter(s))[0][0]

    assert torch.equal(first(0), first(0))
    assert not torch.equal(first(0), first(1))


def test_images_of_different_sizes_or_not_in_memory_are_one_clear_error(tmp_path) -> None:
    mixed = ImageSet("mixed", torch.zeros(2, dtype=torch.long), images=[torch.zeros(3, 8, 8), torch.zeros(3, 9, 9)])
    pattern = r"data\.augment: 'batch' needs every image decoded in memory.*differ in size"
    assert_one_line_error(pattern, epochs, mixed, 1, error=DataError)
    on_disk = ImageSet("files", torch.zeros(2, dtype=torch.long), paths=[tmp_path / "a.png", tmp_path / "b.png"])
    with pytest.raises(DataError, match="are not decoded in memory"):
        epochs(on_disk, 1)


def test_auto_takes_whole_batches_when_the_images_allow_it_and_says_why(tmp_path) -> None:
    in_memory = image_set(n=40, size=16)
    choice = choose_augment("auto", in_memory)
    assert choice.path == "batch" and choice.reason == "auto: the 40 images of random are in memory at 16x16"
    mixed = ImageSet("mixed", torch.zeros(2, dtype=torch.long), images=[torch.zeros(3, 8, 8), torch.zeros(3, 9, 9)])
    assert choose_augment("auto", mixed) == ("crop", "auto: the images of mixed differ in size")
    on_disk = ImageSet("files", torch.zeros(2, dtype=torch.long), paths=[tmp_path / "a.png", tmp_path / "b.png"])
    choice = choose_augment("auto", on_disk)
    assert choice.path == "crop" and "are not decoded in memory (data.cache)" in choice.reason
    # forced either way
    assert choose_augment("sample", in_memory) == ("sample", "data.augment = 'sample'")
    assert choose_augment("crop", in_memory) == ("crop", "data.augment = 'crop'")
    assert choose_augment("batch", in_memory).path == "batch"
    assert_one_line_error(
        r"data\.augment: 'batch' needs.*differ in size", choose_augment, "batch", mixed, error=DataError
    )


# -- data.augment = "crop": crop + flip per image in workers, the rest of the chain in whole batches


def mixed_sizes(n: int = 24) -> ImageSet:
    """Images of several sizes (a list, as a folder of photos decodes): what "auto" sends to the crop path."""
    g = torch.Generator().manual_seed(1)
    pixels = [torch.randint(0, 256, (3, 20 + i % 5, 24 + i % 3), dtype=torch.uint8, generator=g) for i in range(n)]
    return ImageSet("mixed", torch.arange(n) % 4, ["a", "b", "c", "d"], images=pixels)


MULTI_CROP = load_recipe("swav", [("views.0.size", 16), ("views.1.size", 8), ("views.1.count", 2)]).views


def cropped(images: ImageSet, batch: int, rank: int = 0, world: int = 1, workers: int = 0) -> CroppedEpochs:
    args = (batch, 3, torch.device("cpu"), workers, rank, world)
    return CroppedEpochs(images, MULTI_CROP, [0.5] * 3, [0.25] * 3, *args)


def test_crop_path_crops_per_image_then_finishes_whole_batches_with_per_batch_parameters() -> None:
    images = mixed_sizes()
    source = cropped(images, batch=8)
    source.sampler.set_epoch(1)
    batches = list(source)
    assert len(batches) == len(source) == 3
    sampler = EpochSampler(24, 3, 8)
    sampler.set_epoch(1)
    ids = torch.tensor(list(sampler))
    crops = CropMultiView(MULTI_CROP)
    for g, (views, labels, index) in enumerate(batches):
        assert torch.equal(index, ids[g * 8 : (g + 1) * 8] % 24) and torch.equal(labels, images.labels[index])
        assert [tuple(v.shape) for v in views] == [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 2
        assert all(v.dtype == torch.float32 for v in views)
        # each image's crops: torchvision's, seeded by (seed, global id) as the per-sample path seeds them
        expected = []
        for global_id in ids[g * 8 : (g + 1) * 8].tolist():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(3, global_id, 1))
                expected.append(crops(images.images[global_id % 24]))
        u8 = [torch.stack([e[v] for e in expected]) for v in range(4)]
        assert all(c.dtype == torch.uint8 for c in u8)
        # the rest: one draw per global batch, from (seed, epoch, batch)
        finished = source.transform.finish_share(u8, torch.Generator().manual_seed(mix_seed(3, 1, g, 3)), 8, 0)
        for ours, theirs in zip(views, finished, strict=True):
            torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_crop_path_is_the_same_with_workers_and_on_two_processes() -> None:
    images = mixed_sizes()
    one, worker = cropped(images, batch=8), cropped(images, batch=8, workers=1)
    halves = [cropped(images, batch=4, rank=r, world=2) for r in range(2)]
    for s in [one, worker, *halves]:
        s.sampler.set_epoch(2)
    for (views, _, index), (w_views, _, _), *parts in zip(one, worker, *halves, strict=True):
        assert torch.equal(index, torch.cat([p[2] for p in parts]))
        for v, view in enumerate(views):
            torch.testing.assert_close(view, w_views[v], atol=0, rtol=0)
            torch.testing.assert_close(view, torch.cat([p[0][v] for p in parts]))
