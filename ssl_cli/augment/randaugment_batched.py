"""InfoMin's RandAugment on a whole float batch, on the batch's device: the policy of ``ssl_cli.augment.randaugment``
with per-image ops, levels, signs and resampling, grouped by op (no Python loop over images).

Per layer, the images whose op is geometric (rotate, shear, translate) go through one ``affine_grid`` /
``grid_sample`` with a matrix per image (one call for the bilinear ones, one for the bicubic ones); every other op
runs once on the images that drew it (``index_select`` -> op -> ``index_copy``). The images are picked from the
parameters on the CPU, so no step waits for the device.

Each op is PIL's (the official code's, [0]) on float images in [0, 1]. Deviations, each tested op by op against PIL on
uint8 images with fixed parameters (``tests/augment/test_randaugment.py``):

* Float in, float out: PIL truncates or rounds every op's result to uint8, so most ops differ by < 1/255.
* The geometric ops are PIL's affine transform exactly: bilinear taps clamped at the image border inside the image,
  the fill colour for output pixels whose source point lies outside it. Bicubic is torch's (a = -0.75) where PIL's
  uses a = -0.5: within 4/255 of PIL on smooth images, ~0.5/255 on average.
* Equalize, posterize, solarize and solarize-add read the values as uint8 would hold them (rounded to the nearest
  1/255); equalize runs torchvision's batched ``equalize`` on those values, which is PIL's algorithm.
* Colour blends with the float luma, contrast with its mean rounded to a uint8 level (PIL: the rounded luma and its
  rounded mean): within 2/255.

[0] InfoMin, Tian et al. 2020, arXiv:2005.10243; github.com/HobbitLong/PyContrast pycontrast/datasets/RandAugment.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from ssl_cli.augment.randaugment import GEOMETRIC, OPS, RandAugmentParams, op_index

LUMA = (0.299, 0.587, 0.114)
"""PIL's ``convert("L")`` weights (ITU-R 601-2), which colour and contrast blend towards."""

SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
"""PIL's ``ImageFilter.SMOOTH``, the degenerate image of sharpness (its 1-pixel border is the image's own)."""


def _luma(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (r * LUMA[0] + g * LUMA[1] + b * LUMA[2]).unsqueeze(1)


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.blend(degenerate, x, factor)`` with a factor per image, clipped to [0, 1]."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0.0, 1.0)


def _levels(x: torch.Tensor) -> torch.Tensor:
    """The uint8 values the images would hold (0..255, as floats)."""
    return (x * 255.0).round().clamp(0.0, 255.0)


def autocontrast(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """Each channel stretched from its [min, max] to [0, 1]; a flat channel is left as it is."""
    low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    flat = high <= low
    scale = torch.where(flat, 1.0, 1.0 / torch.where(flat, 1.0, high - low))
    return ((x - torch.where(flat, 0.0, low)) * scale).clamp(0.0, 1.0)


def equalize(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return TF.equalize(_levels(x).to(torch.uint8)).float() / 255.0


def invert(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return 1.0 - x


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the ``bits`` high bits of each uint8 value (per image; 8 or more: unchanged)."""
    step = torch.exp2((8.0 - bits).clamp(min=0.0)).view(-1, 1, 1, 1)
    return torch.where(bits.view(-1, 1, 1, 1) >= 8, x, (_levels(x) / step).floor() * step / 255.0)


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert the values at or above ``threshold`` (uint8 units; 256 inverts nothing)."""
    return torch.where(x * 255.0 >= threshold.view(-1, 1, 1, 1) - 0.5, 1.0 - x, x)


def solarize_add(x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """Add ``add`` (uint8 units) to the values below 128, capped at 255."""
    return torch.where(x * 255.0 < 127.5, (x + add.view(-1, 1, 1, 1) / 255.0).clamp(max=1.0), x)


def colour(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, _luma(x), factor)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = (_luma(x).mean((1, 2, 3), keepdim=True) * 255.0 + 0.5).floor() / 255.0
    return _blend(x, mean, factor)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    kernel = SMOOTH.to(x.device, x.dtype).expand(x.shape[1], 1, 3, 3)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=x.shape[1])
    return _blend(x, degenerate, factor)


PIXEL_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "AutoContrast": autocontrast,
    "Equalize": equalize,
    "Invert": invert,
    "Posterize": posterize,
    "Solarize": solarize,
    "SolarizeAdd": solarize_add,
    "Color": colour,
    "Contrast": contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
}


def pil_coefficients(ops: torch.Tensor, arg: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """M x 6 float64: PIL's affine coefficients (a, b, c, d, e, f: the output pixel centre (x, y) reads the input
    at (a x + b y + c, d x + e y + f), in pixels from the top-left corner) of each image's geometric op."""
    arg = arg.double()
    one, zero = torch.ones_like(arg), torch.zeros_like(arg)

    def pick(name: str, value: torch.Tensor, otherwise: torch.Tensor) -> torch.Tensor:
        return torch.where(ops == op_index(name), value, otherwise)

    angle = -torch.deg2rad(arg)  # PIL's rotate: counter-clockwise about (w / 2, h / 2)
    cos, sin, cx, cy = angle.cos(), angle.sin(), width / 2.0, height / 2.0
    a = pick("Rotate", cos, one)
    b = pick("Rotate", sin, pick("ShearX", arg, zero))
    c = pick("Rotate", cx - cos * cx - sin * cy, pick("TranslateXRel", arg * width, zero))
    d = pick("Rotate", -sin, pick("ShearY", arg, zero))
    e = pick("Rotate", cos, one)
    f = pick("Rotate", cy + sin * cx - cos * cy, pick("TranslateYRel", arg * height, zero))
    return torch.stack([a, b, c, d, e, f], 1)


def affine_theta(coefficients: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """M x 2 x 3: PIL's pixel coefficients as ``affine_grid``'s matrices (``align_corners=False``: -1 and 1 are the
    outer edges of the border pixels, x = (u + 1) w / 2 in pixels)."""
    a, b, c, d, e, f = coefficients.unbind(1)
    r = height / width
    row_x = torch.stack([a, b * r, a + b * r + 2.0 * c / width - 1.0], 1)
    row_y = torch.stack([d / r, e, d / r + e + 2.0 * f / height - 1.0], 1)
    return torch.stack([row_x, row_y], 1)


def geometric(x: torch.Tensor, ops: torch.Tensor, arg: torch.Tensor, fill: torch.Tensor, bicubic: bool) -> torch.Tensor:
    """Each image's geometric op (``ops``, ``arg``: M on the CPU) in one ``grid_sample``, as PIL's affine transform:
    taps clamped at the border, ``fill`` (3 values in [0, 1]) where the source point is outside the image."""
    m, _, height, width = x.shape
    theta = affine_theta(pil_coefficients(ops, arg, height, width), height, width).to(x.device)
    grid = F.affine_grid(theta, [m, 1, height, width], align_corners=False)  # float64: exact edge decisions
    inside = ((grid >= -1.0) & (grid < 1.0)).all(-1, keepdim=True).permute(0, 3, 1, 2)
    mode = "bicubic" if bicubic else "bilinear"
    sampled = F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode="border", align_corners=False)
    return torch.where(inside, sampled, fill.to(x.device, x.dtype).view(1, -1, 1, 1)).clamp(0.0, 1.0)


def _update(x: torch.Tensor, picked: torch.Tensor, op: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
    """``x`` with the images ``picked`` (indices on the CPU) replaced by ``op(those images, *args)``."""
    index = picked.to(x.device)
    return x.index_copy(0, index, op(x.index_select(0, index), *args))


def randaugment_batch(images: torch.Tensor, params: RandAugmentParams, fill: torch.Tensor) -> torch.Tensor:
    """RandAugment on float N x 3 x H x W images in [0, 1] with the parameters of ``sample_randaugment`` (on the CPU);
    ``fill``: the geometric ops' fill colour (3 values in [0, 1])."""
    if params.layers == 0 or not params.apply.any():
        return images
    args = params.arguments()
    is_geometric = torch.isin(params.ops, torch.tensor([op_index(name) for name in GEOMETRIC]))
    for layer in range(params.layers):
        ops, on = params.ops[:, layer], params.apply[:, layer]
        for bicubic in (False, True):
            picked = (on & is_geometric[:, layer] & (params.bicubic[:, layer] == bicubic)).nonzero().squeeze(1)
            if len(picked):
                images = _update(images, picked, geometric, ops[picked], args[picked, layer], fill, bicubic)
        for name, pixel_op in PIXEL_OPS.items():
            picked = (on & (ops == OPS.index(name))).nonzero().squeeze(1)
            if len(picked):
                images = _update(images, picked, pixel_op, args[picked, layer].to(images.device, images.dtype))
    return images
