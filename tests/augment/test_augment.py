"""View pipelines: faithful to the SimCLR / BYOL augmentation definitions."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from ssl_cli.augment import MultiView, eval_transform, train_eval_transform, view_transform
from ssl_cli.augment.views import blur_kernel_size
from ssl_cli.config.schema import ViewConfig

ZERO = [0.0, 0.0, 0.0]
ONE = [1.0, 1.0, 1.0]
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def plain(**kwargs) -> ViewConfig:
    """A view that does nothing unless told: full-image crop, every probability 0."""
    base = dict(
        size=32,
        scale=[1.0, 1.0],
        ratio=[1.0, 1.0],
        hflip_prob=0.0,
        jitter_prob=0.0,
        grayscale_prob=0.0,
        blur_prob=0.0,
        solarize_prob=0.0,
    )
    base.update(kwargs)
    return ViewConfig(**base)


def colourful(size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)


def normalised(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    return (x.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def coordinates(size: int = 256) -> torch.Tensor:
    """Channel 0 holds the column, channel 1 the row: a crop's output tells where it came from."""
    r = torch.arange(size, dtype=torch.uint8)
    return torch.stack(
        [r.view(1, -1).expand(size, size), r.view(-1, 1).expand(size, size), torch.zeros(size, size, dtype=torch.uint8)]
    )


def crop_box(out: torch.Tensor) -> tuple[float, float]:
    """Width and height (input pixels) of the region a coordinates() crop came from."""
    n = out.shape[-1]
    xs, ys = out[0] * 255, out[1] * 255
    # the outermost output pixel centres lie half an output pixel inside the crop
    w = (xs.max() - xs.min()).item() * n / (n - 1)
    h = (ys.max() - ys.min()).item() * n / (n - 1)
    return w, h


def find(transform: v2.Compose, kind: type) -> list:
    found = []
    for t in transform.transforms:
        if isinstance(t, kind):
            found.append(t)
        elif isinstance(t, v2.RandomApply):
            found += [inner for inner in t.transforms if isinstance(inner, kind)]
    return found


def test_all_off_is_only_normalisation():
    x = colourful()
    out = view_transform(plain(), MEAN, STD)(x)
    assert out.dtype == torch.float32 and tuple(out.shape) == (3, 32, 32)
    reference = v2.Normalize(MEAN, STD)(v2.ToDtype(torch.float32, scale=True)(x))
    assert torch.equal(out, reference)
    torch.testing.assert_close(out, normalised(x), rtol=0, atol=1e-5)


def test_chain_order_matches_simclr():
    view = ViewConfig(size=32, solarize_prob=0.2)
    t = view_transform(view, MEAN, STD)
    kinds = []
    for step in t.transforms:
        inner = step.transforms[0] if isinstance(step, v2.RandomApply) else step
        kinds.append(type(inner))
    assert kinds == [
        v2.RandomResizedCrop,
        v2.RandomHorizontalFlip,
        v2.ColorJitter,
        v2.RandomGrayscale,
        v2.GaussianBlur,
        v2.RandomSolarize,
        v2.ToDtype,
        v2.Normalize,
    ]
    crop = t.transforms[0]
    assert tuple(crop.size) == (32, 32)
    assert tuple(crop.scale) == (0.08, 1.0)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    norm = t.transforms[-1]
    assert list(norm.mean) == MEAN and list(norm.std) == STD


def test_grayscale_gives_equal_channels():
    x = colourful()
    out = view_transform(plain(grayscale_prob=1.0), ZERO, ONE)(x)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    luma = (0.299 * x[0].float() + 0.587 * x[1].float() + 0.114 * x[2].float()) / 255
    assert (out[0] - luma).abs().max() <= 1.5 / 255
    # a grey-only view of a colourful image is not the identity
    assert not torch.equal(out, normalised(x, ZERO, ONE))


def test_solarize_inverts_bright_pixels():
    ramp = torch.arange(256, dtype=torch.uint8).view(16, 16)
    x = torch.stack([ramp, 255 - ramp, ramp * 7])
    out = view_transform(plain(size=16, solarize_prob=1.0), ZERO, ONE)(x)
    expected = torch.where(x >= 128, 255 - x, x)
    assert torch.equal(torch.round(out * 255).to(torch.uint8), expected)


def test_hflip():
    x = colourful()
    out = view_transform(plain(hflip_prob=1.0), MEAN, STD)(x)
    assert torch.equal(out, view_transform(plain(), MEAN, STD)(x.flip(-1)))
    assert not torch.equal(out, view_transform(plain(), MEAN, STD)(x))


@pytest.mark.parametrize(("size", "kernel"), [(224, 23), (32, 3), (96, 9), (64, 7), (100, 11), (160, 17), (16, 3)])
def test_blur_kernel_size(size: int, kernel: int):
    assert blur_kernel_size(size) == kernel
    blur = find(view_transform(ViewConfig(size=size, blur_prob=1.0), MEAN, STD), v2.GaussianBlur)
    assert len(blur) == 1
    assert tuple(blur[0].kernel_size) == (kernel, kernel)
    assert list(blur[0].sigma) == pytest.approx([0.1, 2.0])


def test_blur_sigma_and_probability_from_recipe():
    t = view_transform(ViewConfig(size=32, blur_prob=0.1, blur_sigma=[0.5, 1.5]), MEAN, STD)
    apply = [s for s in t.transforms if isinstance(s, v2.RandomApply) and isinstance(s.transforms[0], v2.GaussianBlur)]
    assert len(apply) == 1 and apply[0].p == pytest.approx(0.1)
    assert list(apply[0].transforms[0].sigma) == pytest.approx([0.5, 1.5])


@pytest.mark.parametrize("s", [0.5, 1.0, 1.5])
def test_jitter_strength(s: float):
    t = view_transform(ViewConfig(size=32, jitter_strength=s, jitter_prob=0.8), MEAN, STD)
    apply = [a for a in t.transforms if isinstance(a, v2.RandomApply) and isinstance(a.transforms[0], v2.ColorJitter)]
    assert len(apply) == 1 and apply[0].p == pytest.approx(0.8)
    jitter = apply[0].transforms[0]
    b = 0.8 * s
    for factor in (jitter.brightness, jitter.contrast, jitter.saturation):
        assert tuple(factor) == pytest.approx((max(0.0, 1 - b), 1 + b))
    assert tuple(jitter.hue) == pytest.approx((-0.2 * s, 0.2 * s))


def test_jitter_changes_colours():
    x = colourful()
    out = view_transform(plain(jitter_prob=1.0), ZERO, ONE)(x)
    assert not torch.allclose(out, normalised(x, ZERO, ONE), atol=1e-3)


@pytest.mark.parametrize("ratio", [[1.0, 1.0], [3 / 4, 4 / 3]])
def test_crop_scale_respected(ratio):
    torch.manual_seed(0)
    t = view_transform(plain(size=64, scale=[0.5, 0.5], ratio=ratio), ZERO, ONE)
    image = coordinates()
    for _ in range(20):
        w, h = crop_box(t(image))
        assert w * h / 256**2 == pytest.approx(0.5, abs=0.03)


def test_crop_ratio_respected():
    torch.manual_seed(0)
    t = view_transform(plain(size=64, scale=[0.25, 0.25], ratio=[2.0, 2.0]), ZERO, ONE)
    image = coordinates()
    for _ in range(10):
        w, h = crop_box(t(image))
        assert w / h == pytest.approx(2.0, rel=0.05)
        assert w * h / 256**2 == pytest.approx(0.25, abs=0.02)


def test_crop_default_scale_range():
    torch.manual_seed(0)
    t = view_transform(plain(size=32, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3]), ZERO, ONE)
    image = coordinates()
    areas = []
    for _ in range(150):
        w, h = crop_box(t(image))
        areas.append(w * h / 256**2)
    areas_t = torch.tensor(areas)
    assert areas_t.min() >= 0.08 - 0.02 and areas_t.max() <= 1.0 + 1e-6
    assert areas_t.min() < 0.2 and areas_t.max() > 0.8  # the whole range is used
    assert 0.4 < areas_t.mean() < 0.7  # about uniform in [0.08, 1] (mean 0.54)


def _is_grey(out: torch.Tensor, x: torch.Tensor) -> bool:
    return torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def _is_flipped(out: torch.Tensor, x: torch.Tensor) -> bool:
    return torch.allclose(out, normalised(x.flip(-1), ZERO, ONE), atol=1e-5)


def _is_changed(out: torch.Tensor, x: torch.Tensor) -> bool:
    return not torch.allclose(out, normalised(x, ZERO, ONE), atol=1e-5)


@pytest.mark.parametrize(
    ("field", "p", "hit"),
    [
        ("grayscale_prob", 0.2, _is_grey),
        ("hflip_prob", 0.5, _is_flipped),
        ("jitter_prob", 0.8, _is_changed),
        ("blur_prob", 0.5, _is_changed),
        ("solarize_prob", 0.2, _is_changed),
    ],
)
def test_probabilities_respected(field: str, p: float, hit):
    torch.manual_seed(1)
    n = 500
    x = colourful(size=16)
    x[..., :8] = torch.maximum(x[..., :8], torch.tensor(140, dtype=torch.uint8))  # some bright pixels to solarize
    t = view_transform(plain(size=16, **{field: p}), ZERO, ONE)
    hits = sum(hit(t(x), x) for _ in range(n))
    sd = (n * p * (1 - p)) ** 0.5
    assert abs(hits - n * p) < 4 * sd, (field, hits)


def test_views_use_torch_rng():
    x = colourful()
    t = view_transform(ViewConfig(size=24, solarize_prob=0.5), MEAN, STD)
    torch.manual_seed(5)
    a = [t(x) for _ in range(4)]
    torch.manual_seed(5)
    b = [t(x) for _ in range(4)]
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1])


def test_multiview_counts_order_and_sizes():
    views = [
        ViewConfig(count=2, size=32, grayscale_prob=1.0, jitter_prob=0.0, scale=[1.0, 1.0], ratio=[1.0, 1.0]),
        ViewConfig(count=3, size=16, grayscale_prob=0.0, jitter_prob=0.0),
    ]
    mv = MultiView(views, ZERO, ONE)
    assert len(mv) == 5
    x = colourful()
    torch.manual_seed(0)
    out = mv(x)
    assert [tuple(v.shape) for v in out] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 for v in out)
    assert all(_is_grey(v, x) for v in out[:2])
    assert not any(_is_grey(v, x) for v in out[2:])
    assert not torch.equal(out[2], out[3])  # independent random views


def test_eval_transform_same_size_only_normalises():
    x = colourful(32)
    out = eval_transform(32, MEAN, STD)(x)
    assert torch.equal(out, v2.Normalize(MEAN, STD)(v2.ToDtype(torch.float32, scale=True)(x)))
    torch.testing.assert_close(out, normalised(x), rtol=0, atol=1e-5)


def test_eval_transform_resizes_then_centre_crops():
    x = coordinates(64)
    out = eval_transform(32, ZERO, ONE)(x)
    assert tuple(out.shape) == (3, 32, 32)
    resized = v2.Resize(37, antialias=True)(x)  # 32 / 0.875, the ImageNet protocol
    expected = v2.ToDtype(torch.float32, scale=True)(v2.CenterCrop(32)(resized))
    assert torch.equal(out, expected)
    # centred: the crop keeps about 32/37 of the image around its middle
    w, h = crop_box(out)
    assert w == pytest.approx(64 * 32 / 37, abs=2) and h == pytest.approx(64 * 32 / 37, abs=2)
    cx = (out[0] * 255).mean().item()
    assert cx == pytest.approx(31.5, abs=1.5)  # within one resized pixel of the centre
    # deterministic
    assert torch.equal(eval_transform(32, ZERO, ONE)(x), out)


def test_eval_transform_non_square_and_small():
    assert tuple(eval_transform(32, MEAN, STD)(colourful(64)[:, :48]).shape) == (3, 32, 32)
    assert tuple(eval_transform(32, MEAN, STD)(colourful(24)).shape) == (3, 32, 32)


def test_train_eval_transform_shape():
    torch.manual_seed(0)
    out = train_eval_transform(16, MEAN, STD)(colourful(32))
    assert tuple(out.shape) == (3, 16, 16) and out.dtype == torch.float32


def test_per_channel_jitter_overrides_strength():
    """BYOL's jitter (0.4, 0.4, 0.2, 0.1) is not one strength: per-channel fields win, the rest stay derived."""
    view = ViewConfig(size=32, jitter_strength=1.0, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    apply = [a for a in view_transform(view, MEAN, STD).transforms if isinstance(a, v2.RandomApply)]
    jitter = apply[0].transforms[0]
    assert tuple(jitter.brightness) == pytest.approx((0.6, 1.4))
    assert tuple(jitter.contrast) == pytest.approx((0.6, 1.4))
    assert tuple(jitter.saturation) == pytest.approx((0.8, 1.2))
    assert tuple(jitter.hue) == pytest.approx((-0.1, 0.1))
    partly = ViewConfig(size=32, jitter_strength=0.5, saturation=0.0).jitter()
    assert partly == pytest.approx({"brightness": 0.4, "contrast": 0.4, "saturation": 0.0, "hue": 0.1})
