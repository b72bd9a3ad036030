"""Batched view pipeline: the same ops and the same parameter distributions as the per-sample torchvision chain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ssl_cli.augment.batched import BatchedMultiView, BatchedView, ViewParams, crop_boxes, resized_crop
from ssl_cli.augment.views import CropMultiView, MultiView, blur_kernel_size, crop_transform, view_transform
from ssl_cli.config import load_recipe
from ssl_cli.config.schema import ViewConfig

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def smooth(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Natural-ish float images in [0, 1]: random colours at 1/8 resolution, upsampled bicubically and blurred."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 8, size // 8, generator=g)
    up = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return TF.gaussian_blur(up, [5, 5], [1.0, 1.0])


def ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def reference(x: torch.Tensor, p: ViewParams, i: int, view: ViewConfig) -> torch.Tensor:
    """Image ``i`` through torchvision's functional ops with the parameters of ``p`` (float images)."""
    y = TF.resized_crop(x[i], *p.boxes[i].tolist(), [view.size, view.size], antialias=True)
    if p.flip[i]:
        y = TF.horizontal_flip(y)
    if p.jitter[i]:
        b, c, s, h = p.factors[i].tolist()
        ops = [
            lambda t: TF.adjust_brightness(t, b),
            lambda t: TF.adjust_contrast(t, c),
            lambda t: TF.adjust_saturation(t, s),
            lambda t: TF.adjust_hue(t, h),
        ]
        for k in p.order[i].tolist():
            y = ops[k](y)
    if p.gray[i]:
        y = TF.rgb_to_grayscale(y, num_output_channels=3)
    if p.blur[i]:
        k = blur_kernel_size(view.size)
        y = TF.gaussian_blur(y, [k, k], [p.sigma[i].item()] * 2)
    if p.solarize[i]:
        y = TF.solarize(y, 128 / 255)
    return TF.normalize(y, MEAN, STD)


# -- 1. fixed parameters: the ops match torchvision's image by image


def test_chain_matches_torchvision_per_sample():
    view = ViewConfig(size=48, jitter_prob=0.7, grayscale_prob=0.3, blur_prob=0.5, solarize_prob=0.3)
    bv = BatchedView(view, MEAN, STD)
    n = 32
    x = smooth(n, 48, seed=1)
    p = bv.sample(n, 48, 48, torch.Generator().manual_seed(0))
    for flags in (p.flip, p.jitter, p.gray, p.blur, p.solarize):
        assert 0 < flags.sum() < n  # both branches exercised
    # with the sampled crops: close (the resize differs a little, see test_crop_*)
    ref = torch.stack([reference(x, p, i, view) for i in range(n)])
    assert (bv.apply(x, p) - ref).abs().mean() < 0.01
    # with the identity crop, which is exact: the rest of the chain matches tightly
    p.boxes = torch.tensor([[0, 0, 48, 48]]).expand(n, 4)
    ref = torch.stack([reference(x, p, i, view) for i in range(n)])
    torch.testing.assert_close(bv.apply(x, p), ref, atol=1e-4, rtol=0)
    # uint8 input is the same as float input / 255
    u8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(bv.apply(u8, p), bv.apply(u8.float() / 255, p), atol=0, rtol=0)


def test_zero_strength_jitter_ops_are_skipped():
    view = ViewConfig(size=16, jitter_prob=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    bv = BatchedView(view, [0, 0, 0], [1, 1, 1])
    p = bv.sample(8, 16, 16, torch.Generator().manual_seed(0))
    assert not p.jitter.any()  # view_transform drops the jitter altogether
    view = ViewConfig(size=16, jitter_prob=1.0, brightness=0.5, contrast=0.0, saturation=0.0, hue=0.0)
    bv = BatchedView(view, [0, 0, 0], [1, 1, 1])
    p = bv.sample(8, 16, 16, torch.Generator().manual_seed(0))
    p.boxes, p.flip = torch.tensor([[0, 0, 16, 16]]).expand(8, 4), torch.zeros(8, dtype=torch.bool)
    p.gray = p.blur = p.solarize = p.flip
    x = smooth(8, 16)
    expected = torch.stack([TF.adjust_brightness(x[i], p.factors[i, 0].item()) for i in range(8)])
    torch.testing.assert_close(bv.apply(x, p), expected, atol=0, rtol=0)  # no HSV round trip for hue = 0


def output_centres(boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which output rows / columns sample strictly inside their crop (no reading past the crop's edge)."""
    k = torch.arange(size) + 0.5
    src_y = k * boxes[:, 2:3] / size - 0.5
    src_x = k * boxes[:, 3:4] / size - 0.5
    return (src_y >= 0) & (src_y <= boxes[:, 2:3] - 1), (src_x >= 0) & (src_x <= boxes[:, 3:4] - 1)


def crops_and_reference(n: int, side: int, size: int, scale: tuple[float, float], seed: int):
    """Smooth images, sampled boxes, the batched crops and torchvision's per-image antialiased crops."""
    x = smooth(n, side, seed=seed + 2)
    boxes = crop_boxes(n, side, side, scale, (3 / 4, 4 / 3), torch.Generator().manual_seed(seed))
    ref = torch.stack([TF.resized_crop(x[i], *boxes[i].tolist(), [size, size], antialias=True) for i in range(n)])
    return x, boxes, resized_crop(x, boxes, size), ref


def test_crop_upscaling_matches_torchvision():
    _, boxes, out, ref = crops_and_reference(48, 32, 32, (0.08, 1.0), seed=0)
    assert (out - ref).abs().mean() < 2e-3
    # away from the crop's edges it is exactly torchvision's bilinear resize
    rows, cols = output_centres(boxes, 32)
    inside = (rows[:, None, :, None] & cols[:, None, None, :]).expand_as(out)
    assert inside.float().mean() > 0.8
    torch.testing.assert_close(out[inside], ref[inside], atol=1e-5, rtol=0)


def test_crop_downscaling_close_to_antialiased_resize():
    x, boxes, out, ref = crops_and_reference(16, 128, 64, (0.5, 1.0), seed=1)
    assert (out - ref).abs().mean() < 5e-3  # a box too far off by one pixel is ~0.05
    shifted = resized_crop(x, boxes + torch.tensor([1, 1, 0, 0]), 64)
    assert (shifted - ref).abs().mean() > 0.02
    # antialiasing: white noise shrunk 4x keeps ~1.5x the std of torchvision's triangle filter, plain bilinear 3x
    noise = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    ours = resized_crop(noise, torch.tensor([[0, 0, 128, 128]] * 2), 32).std()
    theirs = TF.resize(noise, [32, 32], antialias=True).std()
    assert theirs < ours < 2 * theirs


def test_crop_fallback_is_central_crop():
    """Boxes that never fit fall back to torchvision's centred crop with the ratio clamped."""
    for h, w in [(8, 64), (64, 8), (20, 20)]:
        boxes = crop_boxes(4, h, w, (1.0, 1.0), (1.0, 1.0) if h != w else (2.0, 3.0))
        ratio = (1.0, 1.0) if h != w else (2.0, 3.0)
        t = v2.RandomResizedCrop(8, scale=(1.0, 1.0), ratio=ratio).make_params([torch.empty(3, h, w)])
        assert boxes.tolist() == [[t["top"], t["left"], t["height"], t["width"]]] * 4


def test_finish_on_worker_crops_matches_torchvision_per_sample():
    """data.augment = "crop": uint8 crops at the view's size, the rest of the chain in one batch, image by image as
    torchvision's functional ops with the same parameters."""
    view = ViewConfig(size=24, jitter_prob=0.7, grayscale_prob=0.3, blur_prob=0.5, solarize_prob=0.3)
    bv, n = BatchedView(view, MEAN, STD), 32
    crops = (smooth(n, 24, seed=5) * 255).round().to(torch.uint8)
    c = bv.sample_colour(n, torch.Generator().manual_seed(1))
    for flags in (c.jitter, c.gray, c.blur, c.solarize):
        assert 0 < flags.sum() < n  # both branches exercised
    identity = ViewParams(torch.tensor([[0, 0, 24, 24]]).expand(n, 4), torch.zeros(n, dtype=torch.bool), **vars(c))
    ref = torch.stack([reference(crops.float() / 255, identity, i, view) for i in range(n)])
    torch.testing.assert_close(bv.finish(crops, c), ref, atol=1e-4, rtol=0)


def test_finish_on_the_cpu_in_cache_sized_chunks_is_the_whole_batch_finish(monkeypatch):
    import ssl_cli.augment.batched as batched

    view = load_recipe("byol").views[1].model_copy(update={"size": 24})  # every op on
    bv, n = BatchedView(view, MEAN, STD), 20
    crops = (smooth(n, 24, seed=8) * 255).round().to(torch.uint8)
    c = bv.sample_colour(n, torch.Generator().manual_seed(2))
    monkeypatch.setattr(batched, "CPU_CHUNK_ELEMENTS", 3 * 24 * 24 * 3)  # chunks of 3 images, the last of 2
    chunked = bv.finish(crops, c)
    monkeypatch.setattr(batched, "CPU_CHUNK_ELEMENTS", 2**40)
    torch.testing.assert_close(chunked, bv.finish(crops, c), atol=0, rtol=0)


def test_worker_crops_are_torchvisions_crop_and_flip_in_uint8():
    view = ViewConfig(size=20, scale=[0.2, 0.9], ratio=[0.5, 2.0], hflip_prob=0.5)
    t = crop_transform(view)
    image = (smooth(1, 64, seed=6)[0] * 255).round().to(torch.uint8)[:, :, :48]  # 64 x 48
    flips = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out = t(image)
        torch.manual_seed(seed)
        box = v2.RandomResizedCrop(20, scale=(0.2, 0.9), ratio=(0.5, 2.0)).make_params([image])
        flip = bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip's coin, drawn next
        expected = TF.resized_crop(
            image, box["top"], box["left"], box["height"], box["width"], [20, 20], antialias=True
        )
        expected = TF.horizontal_flip(expected) if flip else expected
        assert out.dtype == torch.uint8 and out.shape == (3, 20, 20) and torch.equal(out, expected)
        flips += flip
    assert 0 < flips < 20
    assert len(CropMultiView(load_recipe("swav").views)) == 8


def test_crop_path_outputs_match_view_transform_statistics():
    """End to end, crops in workers then the batch finish: per-image channel means / stds spread like the per-sample
    pipeline's on images of another size than the view's."""
    view = load_recipe("byol").views[1].model_copy(update={"size": 32})  # every op on, solarize included
    x = (smooth(800, 48, seed=7) * 255).round().to(torch.uint8)
    torch.manual_seed(0)
    t = view_transform(view, MEAN, STD)
    theirs = torch.stack([t(img) for img in x])
    crop = crop_transform(view)
    crops = torch.stack([crop(img) for img in x])
    bv = BatchedView(view, MEAN, STD)
    ours = bv.finish(crops, bv.sample_colour(len(x), torch.Generator().manual_seed(0)))
    for stat in (lambda y: y.mean((2, 3)), lambda y: y.std((2, 3))):
        assert ks(stat(ours).flatten(), stat(theirs).flatten()) < 0.06


# -- 2. parameter distributions match the per-sample reference


@pytest.mark.parametrize(
    "hw, scale, ratio",
    [((48, 64), (0.08, 1.0), (3 / 4, 4 / 3)), ((40, 40), (0.3, 1.0), (0.2, 5.0))],  # the second falls back often
)
def test_crop_box_distribution_matches_torchvision(hw, scale, ratio):
    h, w = hw
    n = 3000
    ours = crop_boxes(n, h, w, scale, ratio, torch.Generator().manual_seed(0)).double()
    torch.manual_seed(0)
    rrc = v2.RandomResizedCrop(8, scale=scale, ratio=ratio)
    image = torch.empty(3, h, w)
    theirs = torch.tensor(
        [[p["top"], p["left"], p["height"], p["width"]] for p in (rrc.make_params([image]) for _ in range(n))]
    ).double()
    assert (ours[:, 2:] >= 1).all() and (ours[:, 0] + ours[:, 2] <= h).all() and (ours[:, 1] + ours[:, 3] <= w).all()
    for stat in (
        lambda b: b[:, 2] * b[:, 3] / (h * w),  # area fraction
        lambda b: (b[:, 3] / b[:, 2]).log(),  # log aspect ratio
        lambda b: (b[:, 0] + b[:, 2] / 2) / h,  # centre row
        lambda b: (b[:, 1] + b[:, 3] / 2) / w,  # centre column
    ):
        assert ks(stat(ours), stat(theirs)) < 0.05


@pytest.mark.parametrize("draw", ["sample", "sample_colour"])
def test_flags_and_factors_distributions(draw: str):
    view = ViewConfig(
        size=16,
        hflip_prob=0.5,
        jitter_prob=0.8,
        jitter_strength=1.5,
        hue=0.2,
        grayscale_prob=0.2,
        blur_prob=0.3,
        blur_sigma=[0.5, 1.5],
        solarize_prob=0.1,
    )
    n = 4000
    bv, g = BatchedView(view, MEAN, STD), torch.Generator().manual_seed(0)
    # sample_colour: the parameters after crop and flip, for views cropped in loader workers (data.augment = "crop")
    p = bv.sample(n, 16, 16, g) if draw == "sample" else bv.sample_colour(n, g)
    if draw == "sample":
        assert abs(p.flip.float().mean().item() - 0.5) < 0.03
    for flags, prob in [(p.jitter, 0.8), (p.gray, 0.2), (p.blur, 0.3), (p.solarize, 0.1)]:
        assert abs(flags.float().mean().item() - prob) < 0.03
    # brightness / contrast / saturation uniform in [max(0, 1 - 1.2), 1 + 1.2], hue in [-0.2, 0.2], sigma in range
    for column, (low, high) in enumerate([(0.0, 2.2)] * 3 + [(-0.2, 0.2)]):
        f = p.factors[:, column]
        assert low <= f.min() < low + 0.01 * (high - low) and high - 0.01 * (high - low) < f.max() <= high
        assert ks(f, torch.empty(n).uniform_(low, high, generator=torch.Generator().manual_seed(1))) < 0.05
    assert 0.5 <= p.sigma.min() and p.sigma.max() <= 1.5 and abs(p.sigma.mean() - 1.0) < 0.03
    # every image gets a permutation of the four ops, and all 24 orders occur about equally often
    assert (p.order.sort(1).values == torch.arange(4)).all()
    _, counts = p.order.unique(dim=0, return_counts=True)
    assert len(counts) == 24 and counts.min() > 0.6 * n / 24


def test_outputs_match_view_transform_statistics():
    """End to end on uint8 images: per-image channel means / stds spread like the per-sample pipeline's."""
    view = load_recipe("byol").views[1].model_copy(update={"size": 32})  # every op on, solarize included
    x = (smooth(800, 32, seed=4) * 255).round().to(torch.uint8)
    torch.manual_seed(0)
    t = view_transform(view, MEAN, STD)
    theirs = torch.stack([t(img) for img in x])
    ours = BatchedView(view, MEAN, STD)(x, torch.Generator().manual_seed(0))
    for stat in (lambda y: y.mean((2, 3)), lambda y: y.std((2, 3))):
        assert ks(stat(ours).flatten(), stat(theirs).flatten()) < 0.06


# -- 3. reproducibility


def test_seeded_reproducibility():
    views = load_recipe("simclr-cifar").views
    mv = BatchedMultiView(views, MEAN, STD)
    x = (smooth(8, 32) * 255).to(torch.uint8)
    a = mv(x, torch.Generator().manual_seed(7))
    b = mv(x, torch.Generator().manual_seed(7))
    c = mv(x, torch.Generator().manual_seed(8))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not any(torch.equal(u, v) for u, v in zip(a, c, strict=True))
    assert not torch.equal(a[0], a[1])  # the two views of one call differ


def test_the_views_of_one_entry_augmented_as_one_batch_are_those_of_each_view_on_its_own():
    """An entry's ``count`` views run as one batch of count x N images: each view still gets its own parameters,
    drawn view after view from the generator, and is cut from its own image; the same as one view at a time."""
    views = [ViewConfig(count=2, size=24, solarize_prob=0.3), ViewConfig(count=3, size=12, scale=[0.05, 0.3])]
    mv = BatchedMultiView(views, MEAN, STD)
    x = (smooth(10, 32, seed=3) * 255).to(torch.uint8)
    one_by_one = [BatchedView(v, MEAN, STD) for v in views for _ in range(v.count)]
    g = torch.Generator().manual_seed(5)
    expected = [v.apply(x, v.sample(20, 32, 32, g).rows(10, 20)) for v in one_by_one]  # rank 1 of 2
    got = mv.share(x, torch.Generator().manual_seed(5), 20, 10)
    assert [tuple(y.shape) for y in got] == [(10, 3, 24, 24)] * 2 + [(10, 3, 12, 12)] * 3
    for y, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(got[2], got[3])  # three local views, three draws
    crops = [(smooth(6, v.view.size, seed=i) * 255).to(torch.uint8) for i, v in enumerate(one_by_one)]
    g = torch.Generator().manual_seed(6)
    expected = [v.finish(c, v.sample_colour(6, g)) for v, c in zip(one_by_one, crops, strict=True)]
    got = mv.finish_share(crops, torch.Generator().manual_seed(6), 6, 0)
    for y, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    float_crop, float_images = crops[0].float() / 255, x.float() / 255
    kept = float_crop.clone(), float_images.clone()
    one_by_one[0].finish(float_crop, one_by_one[0].sample_colour(6, torch.Generator().manual_seed(6)))
    mv.share(float_images, torch.Generator().manual_seed(5), 20, 10)
    assert torch.equal(float_crop, kept[0]) and torch.equal(float_images, kept[1])  # in place only on their copies


# -- 4. shapes and dtypes


@pytest.mark.parametrize(
    "views, image_size, sizes",
    [
        (load_recipe("simclr-cifar").views, 32, [32, 32]),
        ([ViewConfig(count=2, size=64), ViewConfig(count=3, size=96, scale=[0.05, 0.4])], 224, [64, 64, 96, 96, 96]),
        (load_recipe("byol", [("views.*.size", 48)]).views, 100, [48, 48]),
    ],
)
def test_shapes_and_order(views, image_size, sizes):
    x = torch.randint(0, 256, (3, 3, image_size, image_size), dtype=torch.uint8)
    mv = BatchedMultiView(views, MEAN, STD)
    out = mv(x, torch.Generator().manual_seed(0))
    assert len(mv) == len(MultiView(views, MEAN, STD)) == len(out) == len(sizes)
    for y, size in zip(out, sizes, strict=True):
        assert y.shape == (3, 3, size, size) and y.dtype == torch.float32 and torch.isfinite(y).all()


# -- 4. on the GPU (pytest -m cuda)


def mostly_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Within float rounding of each other but for rare pixels at an op's threshold (solarize's 128, a hue sector's
    edge) that land on the other side on another device's arithmetic."""
    diff = (got.cpu() - ref).abs()
    assert diff.mean() < 1e-4 and (diff > 1e-3).float().mean() < 1e-3


@pytest.mark.cuda
def test_on_the_gpu_the_chain_matches_torchvision_per_sample(gpu):
    view = ViewConfig(size=48, jitter_prob=0.7, grayscale_prob=0.3, blur_prob=0.5, solarize_prob=0.3)
    bv = BatchedView(view, MEAN, STD)
    n = 32
    x = smooth(n, 48, seed=1)
    p = bv.sample(n, 48, 48, torch.Generator().manual_seed(0))
    ref = torch.stack([reference(x, p, i, view) for i in range(n)])
    assert (bv.apply(x.to(gpu), p).cpu() - ref).abs().mean() < 0.01  # the sampled crops: close, as on the CPU
    p.boxes = torch.tensor([[0, 0, 48, 48]]).expand(n, 4)  # the identity crop: the rest of the chain, tightly
    ref = torch.stack([reference(x, p, i, view) for i in range(n)])
    out = bv.apply(x.to(gpu), p)
    assert out.device.type == gpu.type
    mostly_close(out, ref)


@pytest.mark.cuda
def test_on_the_gpu_outputs_match_view_transform_statistics(gpu):
    view = load_recipe("byol").views[1].model_copy(update={"size": 32})
    x = (smooth(800, 32, seed=4) * 255).round().to(torch.uint8)
    torch.manual_seed(0)
    t = view_transform(view, MEAN, STD)
    theirs = torch.stack([t(img) for img in x])
    ours = BatchedView(view, MEAN, STD)(x.to(gpu), torch.Generator().manual_seed(0)).cpu()
    for stat in (lambda y: y.mean((2, 3)), lambda y: y.std((2, 3))):
        assert ks(stat(ours).flatten(), stat(theirs).flatten()) < 0.06


@pytest.mark.cuda
def test_on_the_gpu_the_training_batches_are_the_cpu_paths(gpu):
    """``data.augment = "batch"`` on the GPU: the cached images move to the device once (no batch crosses the bus
    after that), and each step's views are the CPU path's views for the same seed."""
    from ssl_cli.data import open_dataset
    from ssl_cli.data.batches import BatchedEpochs

    images = open_dataset(None, role="train")
    views = load_recipe("simclr-cifar").views
    runs = [BatchedEpochs(images, views, MEAN, STD, 16, 0, device) for device in (torch.device("cpu"), gpu)]
    assert runs[1].pixels.device.type == gpu.type
    for run in runs:
        run.sampler.set_epoch(1)
    (cpu_views, _, cpu_index), (gpu_views, _, gpu_index) = (next(iter(r)) for r in runs)
    torch.testing.assert_close(gpu_index, cpu_index)
    for a, b in zip(gpu_views, cpu_views, strict=True):
        assert a.device.type == gpu.type
        mostly_close(a, b)
