"""InfoMin's RandAugment (``[[views]] randaugment = "infomin"``): the policy, its per-image random parameters, and
the ops image by image with PIL, as the official code runs them (the per-sample path).

InfoMin's view (PyContrast ``datasets/util.py``, ``build_transforms`` aug ``"D"``) is random resized crop -> flip ->
colour jitter 0.8 / 0.8 / 0.8 / 0.2 with p 0.8 -> Gaussian blur with p 0.5 -> **RandAugment** -> grey with p 0.2 ->
normalise. Its RandAugment (PyContrast ``datasets/RandAugment.py``, Ross Wightman's timm code of 2019,
``rand-n2-m10-mstd0.5``) does, per image, ``n`` times:

* draw one of the 15 ops of ``OPS`` uniformly (with replacement: the same op may come twice);
* apply it with probability ``prob`` (0.5);
* at a level drawn from N(m, mstd) and clipped to [0, 10] (m 10, mstd 0.5: half the draws are exactly 10);
* with the argument of ``arguments``: rotate 30 t degrees, shear 0.3 t, translate 0.45 t of the side (t = level / 10,
  each negated with probability 1/2); colour / contrast / brightness / sharpness blend factors 0.1 + 1.8 t (never
  negated: at m 10 they only enhance, 1.63 to 1.9); posterize to int(4 t) bits (3 or 4); solarize the values at or above
  int(256 t) (at level 10 the threshold is 256: nothing is inverted); solarize-add int(110 t) to pixels below 128;
* the geometric ops resample bilinear or bicubic, each with probability 1/2, and fill what they uncover with the
  normalisation mean in uint8 (``fill_colour``: 124, 116, 104 for ImageNet's mean, PyContrast's ``img_mean``).

The parameters are drawn with torch (``sample_randaugment``), so the per-sample path stays a pure function of the seed
and the sample id (the loader seeds torch per sample); the official code draws them with Python's ``random`` and
numpy. The same draws feed the whole-batch ops (``ssl_cli.augment.randaugment_batched``).

[0] InfoMin: Tian, Sun, Poole, Krishnan, Schmid, Isola 2020, "What Makes for Good Views for Contrastive Learning?",
    arXiv:2005.10243; code: github.com/HobbitLong/PyContrast (pycontrast/datasets/util.py, RandAugment.py).
[1] RandAugment: Cubuk, Zoph, Shlens, Le 2019, arXiv:1909.13719.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from ssl_cli.config.schema import ViewConfig

OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
"""PyContrast's ``_RAND_TRANSFORMS``, in its order (``Posterize`` is its ``PosterizeTpu``)."""

GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
"""The ops that resample (bilinear or bicubic) and fill; their arguments are negated with probability 1/2."""

MAX_LEVEL = 10.0


def op_index(name: str) -> int:
    return OPS.index(name)


@dataclass
class RandAugmentParams:
    """The random parameters of RandAugment for N images and L = ``randaugment_n`` layers (N x L each, on the CPU).
    A view without RandAugment has L = 0."""

    ops: torch.Tensor  # int64: index into OPS
    apply: torch.Tensor  # bool: the op is applied (probability ``randaugment_prob``)
    level: torch.Tensor  # float64: the magnitude level in [0, 10]
    negate: torch.Tensor  # bool: the geometric ops' argument is negated
    bicubic: torch.Tensor  # bool: the geometric ops resample bicubic (else bilinear)

    def __getitem__(self, rows: slice) -> RandAugmentParams:
        """The parameters of images ``rows`` (a slice, as ``ViewParams.rows`` takes them)."""
        return RandAugmentParams(*(getattr(self, f.name)[rows] for f in fields(self)))

    @property
    def layers(self) -> int:
        return self.ops.shape[1]

    def arguments(self) -> torch.Tensor:
        """N x L float64: each op's argument at its level (``arguments``)."""
        return arguments(self.ops, self.level, self.negate)


def arguments(ops: torch.Tensor, level: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
    """The op arguments at ``level`` (PyContrast's ``LEVEL_TO_ARG``): degrees, shear factors, fractions of the side,
    blend factors, bits, thresholds, additions in uint8 units; 0 for the ops without one."""
    t = level.double() / MAX_LEVEL
    table = {
        "Rotate": 30.0 * t,
        "Posterize": (4.0 * t).floor(),
        "Solarize": (256.0 * t).floor().clamp(max=256.0),
        "SolarizeAdd": (110.0 * t).floor(),
        "ShearX": 0.3 * t,
        "ShearY": 0.3 * t,
        "TranslateXRel": 0.45 * t,
        "TranslateYRel": 0.45 * t,
        **{name: 1.8 * t + 0.1 for name in ("Color", "Contrast", "Brightness", "Sharpness")},
    }
    out = torch.zeros_like(t)
    for name, value in table.items():
        out = torch.where(ops == op_index(name), value, out)
    geometric = torch.isin(ops, torch.tensor([op_index(n) for n in GEOMETRIC]))
    return torch.where(geometric & negate, -out, out)


def randaugment_layers(view: ViewConfig) -> int:
    return view.randaugment_n if view.randaugment != "none" else 0


def sample_randaugment(view: ViewConfig, n: int, generator: torch.Generator | None = None) -> RandAugmentParams:
    """RandAugment's parameters for ``n`` images (``generator``: a CPU generator, None for torch's global one). A view
    without RandAugment draws nothing (its other parameters keep their random streams)."""
    layers = randaugment_layers(view)
    if layers == 0:
        empty = torch.zeros(n, 0)
        return RandAugmentParams(empty.long(), empty.bool(), empty.double(), empty.bool(), empty.bool())
    ops = torch.randint(len(OPS), (n, layers), generator=generator)
    apply = torch.rand(n, layers, generator=generator) < view.randaugment_prob
    noise = torch.randn(n, layers, generator=generator, dtype=torch.float64)
    level = (view.randaugment_m + view.randaugment_mstd * noise).clamp(0.0, MAX_LEVEL)
    negate = torch.rand(n, layers, generator=generator) < 0.5
    bicubic = torch.rand(n, layers, generator=generator) < 0.5
    return RandAugmentParams(ops, apply, level, negate, bicubic)


def fill_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    """The geometric ops' fill for uncovered pixels: the normalisation mean in uint8 (PyContrast's ``img_mean``)."""
    r, g, b = (min(255, round(255 * m)) for m in mean)
    return r, g, b


# -- the ops on one PIL image (the per-sample path): PIL's own functions, as the official code calls them

PilOp = Callable[[Image.Image, float, dict], Image.Image]


def _affine(coefficients: Callable[[float, int, int], tuple[float, ...]]) -> PilOp:
    """A geometric op: PIL's affine transform (output pixel centre -> input point, in pixels) with the fill."""

    def op(image: Image.Image, arg: float, kwargs: dict) -> Image.Image:
        return image.transform(image.size, Image.Transform.AFFINE, coefficients(arg, *image.size), **kwargs)

    return op


def _solarize_add(image: Image.Image, add: float, _: dict) -> Image.Image:
    lut = [min(255, i + int(add)) if i < 128 else i for i in range(256)]
    return image.point(lut * len(image.getbands()))


PIL_OPS: dict[str, PilOp] = {
    "AutoContrast": lambda image, _, __: ImageOps.autocontrast(image),
    "Equalize": lambda image, _, __: ImageOps.equalize(image),
    "Invert": lambda image, _, __: ImageOps.invert(image),
    "Rotate": lambda image, degrees, kwargs: image.rotate(degrees, **kwargs),
    "Posterize": lambda image, bits, _: ImageOps.posterize(image, int(bits)) if bits < 8 else image,
    "Solarize": lambda image, threshold, _: ImageOps.solarize(image, int(threshold)),
    "SolarizeAdd": _solarize_add,
    "Color": lambda image, factor, _: ImageEnhance.Color(image).enhance(factor),
    "Contrast": lambda image, factor, _: ImageEnhance.Contrast(image).enhance(factor),
    "Brightness": lambda image, factor, _: ImageEnhance.Brightness(image).enhance(factor),
    "Sharpness": lambda image, factor, _: ImageEnhance.Sharpness(image).enhance(factor),
    "ShearX": _affine(lambda f, w, h: (1.0, f, 0.0, 0.0, 1.0, 0.0)),
    "ShearY": _affine(lambda f, w, h: (1.0, 0.0, 0.0, f, 1.0, 0.0)),
    "TranslateXRel": _affine(lambda f, w, h: (1.0, 0.0, f * w, 0.0, 1.0, 0.0)),
    "TranslateYRel": _affine(lambda f, w, h: (1.0, 0.0, 0.0, 0.0, 1.0, f * h)),
}


def pil_op(image: Image.Image, name: str, arg: float, bicubic: bool, fill: tuple[int, int, int]) -> Image.Image:
    """One op of the policy on a PIL RGB image with an explicit argument (``arguments``)."""
    resample = Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR
    kwargs = {"resample": resample, "fillcolor": fill} if name in GEOMETRIC else {}
    return PIL_OPS[name](image, arg, kwargs)


def randaugment_image(
    image: torch.Tensor, params: RandAugmentParams, row: int, fill: tuple[int, int, int]
) -> torch.Tensor:
    """RandAugment on one uint8 3 x H x W image with the parameters of row ``row``, op by op through PIL."""
    if not params.apply[row].any():
        return image
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    args = params.arguments()[row].tolist()
    for layer in range(params.layers):
        if params.apply[row, layer]:
            name = OPS[int(params.ops[row, layer])]
            pil = pil_op(pil, name, args[layer], bool(params.bicubic[row, layer]), fill)
    return torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class RandAugment(torch.nn.Module):
    """The per-sample step of a view with ``randaugment = "infomin"``: uint8 3 x H x W in and out. Its parameters come
    from torch's global generator, which the loader seeds per sample (``ssl_cli.data.loader.ViewDataset``)."""

    def __init__(self, view: ViewConfig, mean: Sequence[float]) -> None:
        super().__init__()
        self.view = view
        self.fill = fill_colour(mean)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8:
            raise TypeError(f"RandAugment takes uint8 images (its ops are PIL's), got {image.dtype}")
        return randaugment_image(image, sample_randaugment(self.view, 1), 0, self.fill)

    def extra_repr(self) -> str:
        v = self.view
        return f"n={v.randaugment_n}, m={v.randaugment_m}, mstd={v.randaugment_mstd}, p={v.randaugment_prob}"
