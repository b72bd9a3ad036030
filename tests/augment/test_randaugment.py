"""InfoMin's RandAugment (``[[views]] randaugment = "infomin"``): the official ops and levels, the whole-batch ops
against them op by op, the drawn parameters against the policy, and the preset taken by every path.

The official code (HobbitLong/PyContrast, pycontrast/datasets/RandAugment.py) is a copy of timm's ``auto_augment``
of 2019, whose op functions and level tables timm still ships unchanged: ``timm.data.auto_augment`` is the reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm.data.auto_augment as official
import torch
import torch.nn.functional as F
from helpers import invoke, user_error
from PIL import Image

from ssl_cli.augment.batched import BatchedMultiView, BatchedView
from ssl_cli.augment.randaugment import (
    GEOMETRIC,
    OPS,
    RandAugment,
    RandAugmentParams,
    arguments,
    fill_colour,
    pil_op,
    randaugment_image,
    sample_randaugment,
)
from ssl_cli.augment.randaugment_batched import randaugment_batch
from ssl_cli.augment.views import CropMultiView, MultiView, view_transform
from ssl_cli.config import load_recipe
from ssl_cli.config.schema import ViewConfig
from ssl_cli.data.batches import BatchedEpochs, CroppedEpochs
from ssl_cli.data.images import ImageSet
from ssl_cli.data.loader import ViewDataset
from ssl_cli.errors import RecipeError

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
FILL = fill_colour(MEAN)
ZERO, ONE = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]

OFFICIAL = {  # our op name -> (timm / PyContrast op function, its LEVEL_TO_ARG name)
    "AutoContrast": (official.auto_contrast, "AutoContrast"),
    "Equalize": (official.equalize, "Equalize"),
    "Invert": (official.invert, "Invert"),
    "Rotate": (official.rotate, "Rotate"),
    "Posterize": (official.posterize, "Posterize"),  # PyContrast's "PosterizeTpu": int(level / 10 * 4) bits
    "Solarize": (official.solarize, "Solarize"),
    "SolarizeAdd": (official.solarize_add, "SolarizeAdd"),
    "Color": (official.color, "Color"),
    "Contrast": (official.contrast, "Contrast"),
    "Brightness": (official.brightness, "Brightness"),
    "Sharpness": (official.sharpness, "Sharpness"),
    "ShearX": (official.shear_x, "ShearX"),
    "ShearY": (official.shear_y, "ShearY"),
    "TranslateXRel": (official.translate_x_rel, "TranslateXRel"),
    "TranslateYRel": (official.translate_y_rel, "TranslateYRel"),
}


def textured(n: int, height: int = 24, width: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 images with both smooth gradients and fine texture (so sharpness and equalize have work to do)."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(height, width), mode="bicubic", align_corners=False)
    noise = 0.08 * torch.rand(n, 3, height, width, generator=g)
    return ((0.85 * low + noise).clamp(0, 1) * 255).round().to(torch.uint8)


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())


def from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def fixed(n: int, op: str, level: float, bicubic: bool = False, layers: int = 1) -> RandAugmentParams:
    """Every image applies ``op`` at ``level`` in every layer; the sign alternates between images."""
    shape = (n, layers)
    negate = (torch.arange(n) % 2 == 0).view(n, 1).expand(shape)
    return RandAugmentParams(
        torch.full(shape, OPS.index(op)),
        torch.ones(shape, dtype=torch.bool),
        torch.full(shape, level, dtype=torch.float64),
        negate.clone(),
        torch.full(shape, bicubic),
    )


def infomin(**kwargs) -> ViewConfig:
    return ViewConfig(size=24, randaugment="infomin", **kwargs)


# -- 1. the policy is the official one


def test_op_list_and_levels_are_pycontrasts():
    assert list(OPS) == official._RAND_TRANSFORMS  # PyContrast's list; its "PosterizeTpu" is timm's "Posterize"
    levels = torch.tensor([0.0, 2.5, 7.49, 7.5, 8.7, 9.99, 10.0], dtype=torch.float64)
    for k, name in enumerate(OPS):
        level_to_arg = official.LEVEL_TO_ARG[OFFICIAL[name][1]]
        ops = torch.full((len(levels),), k)
        ours = arguments(ops, levels, torch.zeros(len(levels), dtype=torch.bool))
        flipped = arguments(ops, levels, torch.ones(len(levels), dtype=torch.bool))
        for level, a, b in zip(levels.tolist(), ours.tolist(), flipped.tolist(), strict=True):
            expected = 0.0 if level_to_arg is None else abs(level_to_arg(level, {})[0])  # timm negates at random
            assert a == pytest.approx(expected, abs=1e-12), (name, level)
            assert b == pytest.approx(-a if name in GEOMETRIC else a, abs=1e-12), (name, level)
    # the values at the InfoMin magnitude, by hand from PyContrast's LEVEL_TO_ARG
    at = {name: arguments(torch.tensor([OPS.index(name)]), torch.tensor([10.0, 8.7]), torch.zeros(2, dtype=torch.bool))
          for name in OPS}  # fmt: skip
    assert at["Rotate"].tolist() == pytest.approx([30.0, 26.1])
    assert at["ShearX"].tolist() == pytest.approx([0.3, 0.261])
    assert at["TranslateYRel"].tolist() == pytest.approx([0.45, 0.3915])
    assert at["Color"].tolist() == pytest.approx([1.9, 1.666])
    assert at["Posterize"].tolist() == [4.0, 3.0]
    assert at["Solarize"].tolist() == [256.0, 222.0]  # 256: nothing is inverted at level 10, as in the official code
    assert at["SolarizeAdd"].tolist() == [110.0, 95.0]
    assert FILL == (124, 116, 104)  # PyContrast's img_mean for ImageNet's mean


@pytest.mark.parametrize("name", OPS)
def test_per_sample_ops_are_the_official_ops(name: str):
    """The per-sample path's PIL ops give exactly the official functions' images (both resamplings)."""
    image = to_pil(textured(1, seed=1)[0])
    fn = OFFICIAL[name][0]
    if name in GEOMETRIC:
        for arg in (-26.1, 30.0) if name == "Rotate" else (-0.3, 0.261):
            for bicubic, resample in ((False, Image.Resampling.BILINEAR), (True, Image.Resampling.BICUBIC)):
                theirs = fn(image, arg, fillcolor=FILL, resample=resample)
                ours = pil_op(image, name, arg, bicubic, FILL)
                assert np.array_equal(np.asarray(ours), np.asarray(theirs)), (name, arg, resample)
        return
    level_args = {"Posterize": (3, 4), "Solarize": (222, 256), "SolarizeAdd": (95, 110)}
    for arg in (
        (0.0,) if OFFICIAL[name][1] in ("AutoContrast", "Equalize", "Invert") else level_args.get(name, (1.63, 1.9))
    ):
        theirs = fn(image) if arg == 0.0 else fn(image, arg)
        assert np.array_equal(np.asarray(pil_op(image, name, arg, False, FILL)), np.asarray(theirs)), (name, arg)


# -- 2. the whole-batch ops against PIL, op by op on fixed parameters

# PIL rounds or truncates each op's result to uint8 and the batch stays float: < 1/255 for most ops. Colour, contrast
# and sharpness blend towards PIL's integer-rounded grey / smoothed image with factors up to 1.9: ~1.4/255. Bicubic is
# torch's (a = -0.75), PIL's a = -0.5: up to ~4/255 on these images, ~0.5/255 on average.
TOLERANCE = {"max": 1.5 / 255, "mean": 0.5 / 255}
BICUBIC_TOLERANCE = {"max": 5.0 / 255, "mean": 1.0 / 255}


@pytest.mark.parametrize(
    ("name", "bicubic"), [(name, False) for name in OPS] + [(name, True) for name in GEOMETRIC]
)  # fmt: skip
def test_batched_op_matches_pil(name: str, bicubic: bool):
    n = 6
    x = textured(n, seed=2)
    for level in (8.7, 10.0):
        params = fixed(n, name, level, bicubic)
        ours = randaugment_batch(x.float() / 255, params, torch.tensor(FILL) / 255.0)
        theirs = torch.stack([randaugment_image(x[i], params, i, FILL) for i in range(n)]).float() / 255
        diff = (ours - theirs).abs()
        tolerance = BICUBIC_TOLERANCE if bicubic else TOLERANCE
        assert diff.max() <= tolerance["max"] and diff.mean() <= tolerance["mean"], (name, level, diff.max() * 255)
        if (name, level) != ("Solarize", 10.0):  # threshold 256 inverts nothing, officially
            # every image changes by more than the tolerance: an op that did nothing would fail the comparison
            change = (theirs - x.float() / 255).abs().amax((1, 2, 3))
            assert (change > 2 * tolerance["max"]).all(), (name, level, change * 255)
    if name in GEOMETRIC:  # the sign matters: negated and not negated images move differently
        params = fixed(2, name, 10.0, bicubic)
        out = randaugment_batch(x[:1].expand(2, -1, -1, -1).float() / 255, params, torch.tensor(FILL) / 255.0)
        assert (out[0] - out[1]).abs().mean() > 10 / 255


def test_a_wrong_level_is_caught_by_the_comparison():
    """The check itself: the same op one level step off, or bilinear for bicubic, is outside the tolerance."""
    x = textured(4, seed=3)
    theirs = torch.stack([randaugment_image(x[i], fixed(4, "Rotate", 9.0), i, FILL) for i in range(4)]).float() / 255
    off = randaugment_batch(x.float() / 255, fixed(4, "Rotate", 8.7), torch.tensor(FILL) / 255.0)
    assert (off - theirs).abs().max() > TOLERANCE["max"]
    theirs = torch.stack([randaugment_image(x[i], fixed(4, "Color", 8.0), i, FILL) for i in range(4)]).float() / 255
    off = randaugment_batch(x.float() / 255, fixed(4, "Color", 8.7), torch.tensor(FILL) / 255.0)
    assert (off - theirs).abs().max() > TOLERANCE["max"]


def test_every_image_of_a_batch_takes_its_own_draws():
    """One batch call with the random policy (2 layers, every op) is, image by image, the per-sample PIL chain with
    that image's parameters. Two ops compound the rounding (a value one uint8 level off can cross a posterize or
    solarize edge): a small mean and a few far pixels."""
    n = 48
    x = textured(1, seed=4).expand(n, -1, -1, -1)  # one image: any difference comes from the parameters
    params = sample_randaugment(infomin(randaugment_prob=0.9), n, torch.Generator().manual_seed(0))
    ours = randaugment_batch(x.float() / 255, params, torch.tensor(FILL) / 255.0)
    theirs = torch.stack([randaugment_image(x[i], params, i, FILL) for i in range(n)]).float() / 255
    diff = (ours - theirs).abs()
    assert diff.mean() < 1.5 / 255 and (diff > 4 / 255).float().mean() < 0.02
    per_image = diff.mean((1, 2, 3))
    assert (per_image < 6 / 255).all(), per_image * 255
    distinct = {tuple(o.flatten()[:64].tolist()) for o in (ours * 255).round()}
    assert len(distinct) > n * 0.6  # different images, not one draw for the whole batch


# -- 3. the drawn parameters follow the policy


def test_drawn_parameters_follow_the_policy():
    n, layers = 12000, 2
    p = sample_randaugment(infomin(), n, torch.Generator().manual_seed(0))
    assert p.ops.shape == p.level.shape == (n, layers)
    total = n * layers

    def near(count: float, prob: float) -> bool:
        return abs(count - total * prob) < 4.5 * math.sqrt(total * prob * (1 - prob))

    counts = torch.bincount(p.ops.flatten(), minlength=len(OPS))
    assert all(near(c, 1 / 15) for c in counts.tolist()), counts  # uniform, with replacement
    assert (p.ops[:, 0] == p.ops[:, 1]).float().mean().item() == pytest.approx(1 / 15, abs=0.01)
    for flags in (p.apply, p.negate, p.bicubic):
        assert near(flags.sum().item(), 0.5)
    # level ~ N(10, 0.5) clipped to [0, 10]: half exactly 10, the rest 10 - |N(0, 0.5)|
    level = p.level.flatten()
    assert near((level == 10.0).sum().item(), 0.5) and level.min() >= 0
    below = (10.0 - level[level < 10.0]).sort().values
    half_normal = torch.special.erf(below / (0.5 * math.sqrt(2)))
    empirical = torch.arange(1, len(below) + 1, dtype=torch.float64) / len(below)
    assert (empirical - half_normal).abs().max() < 0.03  # Kolmogorov-Smirnov against the half-normal
    # other settings: the magnitude, its noise and the op probability are the recipe's
    q = sample_randaugment(infomin(randaugment_n=3, randaugment_m=5.0, randaugment_mstd=1.0, randaugment_prob=0.3),
                           n, torch.Generator().manual_seed(1))  # fmt: skip
    assert q.ops.shape == (n, 3)
    assert q.level.mean().item() == pytest.approx(5.0, abs=0.03) and q.level.std().item() == pytest.approx(1, abs=0.03)
    assert q.apply.float().mean().item() == pytest.approx(0.3, abs=0.01)
    exact = sample_randaugment(infomin(randaugment_m=7.0, randaugment_mstd=0.0), 50, torch.Generator().manual_seed(2))
    assert (exact.level == 7.0).all()


def test_a_view_without_randaugment_draws_what_it_drew_before():
    """RandAugment's draws come after every other parameter: the other draws are the same with and without it, and
    a view without it takes nothing from the generator."""
    plain, on = BatchedView(ViewConfig(size=24), MEAN, STD), BatchedView(infomin(), MEAN, STD)
    a, b = (
        plain.sample(16, 24, 24, torch.Generator().manual_seed(0)),
        on.sample(16, 24, 24, torch.Generator().manual_seed(0)),
    )
    for field in ("boxes", "flip", "jitter", "factors", "order", "gray", "blur", "sigma", "solarize"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.randaugment.layers == 0 and b.randaugment.layers == 2
    g = torch.Generator().manual_seed(5)
    sample_randaugment(ViewConfig(size=24), 16, g)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(5)))


# -- 4. every path takes the preset


def test_per_sample_chain_order_and_seeding():
    t = view_transform(infomin(), MEAN, STD)
    kinds = [
        type(s.transforms[0] if hasattr(s, "p") and hasattr(s, "transforms") else s).__name__ for s in t.transforms
    ]
    assert kinds == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "ColorJitter",
        "GaussianBlur",
        "RandAugment",
        "RandomGrayscale",
        "ToDtype",
        "Normalize",
    ]  # fmt: skip  (InfoMin's order: grey after RandAugment)
    assert not any(isinstance(s, RandAugment) for s in view_transform(ViewConfig(size=24), MEAN, STD).transforms)
    # the per-sample step draws the policy's parameters from torch's generator (seeded per sample by the loader)
    step, x = RandAugment(infomin(randaugment_prob=1.0), MEAN), textured(1, seed=5)[0]
    outs = []
    for seed in range(6):
        torch.manual_seed(seed)
        out = step(x)
        torch.manual_seed(seed)
        assert torch.equal(out, randaugment_image(x, sample_randaugment(step.view, 1), 0, FILL))
        outs.append(out)
    torch.manual_seed(0)
    assert torch.equal(step(x), outs[0]) and len({o.float().sum().item() for o in outs}) == 6


def test_grey_comes_after_randaugment_on_every_path():
    """Grey with p 1 after RandAugment leaves grey images even where a rotation filled in the (coloured) mean; grey
    before it would leave the fill coloured."""
    view = infomin(
        scale=[1.0, 1.0], hflip_prob=0.0, jitter_prob=0.0, blur_prob=0.0, grayscale_prob=1.0, randaugment_prob=1.0
    )
    x = textured(12, height=24, width=24, seed=6)

    def grey(out: torch.Tensor) -> bool:
        rgb = out * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
        return bool((rgb.amax(-3) - rgb.amin(-3)).max() < 1e-5)

    torch.manual_seed(0)
    assert all(grey(view_transform(view, MEAN, STD)(image)) for image in x)
    bv = BatchedView(view, MEAN, STD)
    assert all(grey(out) for out in bv(x, torch.Generator().manual_seed(0)))
    p = bv.sample(12, 24, 24, torch.Generator().manual_seed(0))
    assert p.randaugment.apply.all() and torch.isin(p.randaugment.ops, torch.tensor([3, 11, 12, 13, 14])).any()
    # and only after it: grey(RandAugment(x)), not grey(RandAugment(grey(x)))
    luma = torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)
    after = (randaugment_batch(x.float() / 255, p.randaugment, torch.tensor(FILL) / 255) * luma).sum(1, keepdim=True)
    expected = (after - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(bv.apply(x, p), expected, atol=1e-5, rtol=0)


def test_batch_and_crop_paths_apply_the_preset(monkeypatch):
    """``batch`` (``share``) and ``crop`` (``finish_share``) both run RandAugment with each image's own draws; the
    same views without the preset differ from them."""
    import ssl_cli.augment.batched as batched

    calls: list[RandAugmentParams] = []

    def spy(images: torch.Tensor, params: RandAugmentParams, fill: torch.Tensor) -> torch.Tensor:
        calls.append(params)
        return randaugment_batch(images, params, fill)

    monkeypatch.setattr(batched, "randaugment_batch", spy)
    views = load_recipe("infomin-cifar").views
    plain = [v.model_copy(update={"randaugment": "none"}) for v in views]
    x = textured(8, height=32, width=32, seed=7)
    on = BatchedMultiView(views, MEAN, STD).share(x, torch.Generator().manual_seed(0), 16, 8)
    off = BatchedMultiView(plain, MEAN, STD).share(x, torch.Generator().manual_seed(0), 16, 8)
    # one call for the entry's two views (augmented as one batch), each with this rank's 8 rows of the 16 drawn
    assert len(calls) == 1 and calls[0].ops.shape == (16, 2)
    assert all(not torch.allclose(a, b) for a, b in zip(on, off, strict=True))
    crops = [torch.stack([c[i] for c in (CropMultiView(views)(image) for image in x)]) for i in range(2)]
    on = BatchedMultiView(views, MEAN, STD).finish_share(crops, torch.Generator().manual_seed(1), 8, 0)
    off = BatchedMultiView(plain, MEAN, STD).finish_share(crops, torch.Generator().manual_seed(1), 8, 0)
    assert len(calls) == 2 and all(not torch.allclose(a, b) for a, b in zip(on, off, strict=True))
    assert len(MultiView(views, MEAN, STD).transforms) == 2


def test_the_three_data_paths_train_on_the_preset():
    """``sample`` (loader workers), ``batch`` and ``crop`` (``ssl_cli.data.batches``) all yield other views with the
    preset than without it, reproducibly."""
    pixels = textured(8, height=32, width=32, seed=9)
    images = ImageSet("tiny", torch.arange(8) % 2, ["a", "b"], images=pixels)
    views = load_recipe("infomin-cifar").views
    plain = [v.model_copy(update={"randaugment": "none"}) for v in views]

    def first_views(path: str, views: list[ViewConfig]) -> list[torch.Tensor]:
        if path == "sample":
            dataset = ViewDataset(images, MultiView(views, MEAN, STD), seed=3)
            return [torch.stack(v) for v in zip(*(dataset[i][0] for i in range(8)), strict=True)]
        cpu = torch.device("cpu")
        source = (
            BatchedEpochs(images, views, MEAN, STD, 8, 3, cpu)
            if path == "batch"
            else CroppedEpochs(images, views, MEAN, STD, 8, 3, cpu, 0)
        )
        source.sampler.set_epoch(0)
        return next(iter(source))[0]

    for path in ("sample", "batch", "crop"):
        on, again, off = first_views(path, views), first_views(path, views), first_views(path, plain)
        assert all(torch.equal(a, b) for a, b in zip(on, again, strict=True)), path
        assert all(not torch.allclose(a, b) for a, b in zip(on, off, strict=True)), path


def test_finish_in_cpu_chunks_is_the_whole_batch_finish(monkeypatch):
    import ssl_cli.augment.batched as batched

    bv, n = BatchedView(infomin(), MEAN, STD), 10
    crops = textured(n, height=24, width=24, seed=8)
    c = bv.sample_colour(n, torch.Generator().manual_seed(3))
    monkeypatch.setattr(batched, "CPU_CHUNK_ELEMENTS", 3 * 24 * 24 * 3)  # chunks of 3 images
    chunked = bv.finish(crops, c)
    monkeypatch.setattr(batched, "CPU_CHUNK_ELEMENTS", 2**40)
    torch.testing.assert_close(chunked, bv.finish(crops, c), atol=1e-6, rtol=0)


# -- 5. the recipe keys


def test_any_recipe_names_the_preset_and_bad_values_are_one_line():
    recipe = load_recipe("simclr-cifar", ["views.*.randaugment=infomin", "views.*.randaugment_m=9"])
    assert [(v.randaugment, v.randaugment_n, v.randaugment_m) for v in recipe.views] == [("infomin", 2, 9.0)]
    assert load_recipe("mocov2").views[0].randaugment == "none"
    bad = {
        "views.*.randaugment=rand": "views.0.randaugment: Input should be 'none' or 'infomin'",
        "views.0.randaugment_n=3": "views.0.randaugment_n: does nothing while randaugment = 'none'",
    }
    for assignment, message in bad.items():
        with pytest.raises(RecipeError, match=message) as info:
            load_recipe("simclr-cifar", [assignment])
        assert "\n" not in str(info.value) and str(info.value).startswith(f"--set {assignment.split('=')[0]}")
    for key, value in [
        ("randaugment_n", 0),
        ("randaugment_m", 10.5),
        ("randaugment_mstd", -1),
        ("randaugment_prob", 2),
    ]:
        with pytest.raises(RecipeError, match=rf"views.0.{key}: Input should be"):
            load_recipe("infomin-cifar", [(f"views.*.{key}", value)])
    result = invoke("recipes", "show", "simclr-cifar", "--set", "views.*.randaugment=yes")
    user_error(result, "views.0.randaugment", "'none' or 'infomin'")


@pytest.mark.cuda
def test_the_batch_ops_on_cuda_match_the_cpu(gpu):
    view = infomin(randaugment_prob=1.0)
    params = sample_randaugment(view, 64, torch.Generator().manual_seed(0))
    x = textured(64, seed=10).float() / 255
    fill = torch.tensor(FILL) / 255.0
    cpu, cuda = randaugment_batch(x, params, fill), randaugment_batch(x.to(gpu), params, fill)
    # equalize / posterize / solarize read uint8 levels: a value at a rounding edge may land one level apart
    diff = (cuda.cpu() - cpu).abs()
    assert diff.mean() < 1e-3 and (diff > 2 / 255).float().mean() < 1e-3
