"""Batched view pipelines: the SimCLR / BYOL augmentation chain on a whole N x 3 x H x W batch at once.

The same chain as :func:`ssl_cli.augment.views.view_transform` (SimCLR, Chen et al. 2020, arXiv:2002.05709,
Appendix A): random resized crop -> horizontal flip -> colour jitter with probability p (brightness, contrast,
saturation, hue in a random order) -> grayscale -> Gaussian blur -> solarize -> normalise; with
``randaugment = "infomin"``, InfoMin's: ... jitter -> blur -> RandAugment (``ssl_cli.augment.randaugment_batched``)
-> grayscale -> solarize -> normalise. Every random parameter
is drawn per image, on the CPU from the given ``torch.Generator`` (so a seed reproduces the views on any device),
following torchvision's ``transforms.v2`` sampling; the image ops then run as whole-batch tensor ops on the input's
device (no Python loop over images).

Deviations from the per-sample torchvision pipeline (all small, all on purpose):

* The batch is converted to float in [0, 1] first and stays float: no rounding to uint8 after each op.
* Crop + resize is one ``torchvision.ops.roi_align`` call (``aligned=True``, adaptive sampling). When upscaling it
  is bilinear with ``align_corners=False`` like ``F.resize``, except that the outermost half pixel of a crop reads
  the real neighbouring pixels instead of replicating the crop's edge. When downscaling it averages
  ceil(crop / size)^2 bilinear samples per output pixel (about a box filter one output pixel wide) where
  torchvision's antialiased resize uses a triangle filter twice as wide: a little less smoothing (white noise shrunk
  4x keeps ~1.5x the std of torchvision's output, plain bilinear 3x; at exactly 2x it is plain bilinear). On smooth
  images the two agree to a mean absolute difference of ~2e-3 (tested).
* Solarize inverts pixels >= 128 / 255 (torchvision inverts uint8 values >= 128).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from ssl_cli.augment.randaugment import RandAugmentParams, fill_colour, sample_randaugment
from ssl_cli.augment.randaugment_batched import randaugment_batch
from ssl_cli.augment.views import blur_kernel_size
from ssl_cli.config.schema import ViewConfig

CPU_CHUNK_ELEMENTS = 2**19
"""On the CPU, ``BatchedView.finish`` runs on chunks of about this many values (2 MiB of float32: a few 224 px
images, a whole CIFAR batch), so that each op's pass stays in the cache: at 224 px that is ~3x faster than one pass
over a 32-image batch per op. The outputs are the same (every op is per image)."""

LUMA = (0.2989, 0.587, 0.114)
"""torchvision's grayscale weights (``rgb_to_grayscale``: ITU-R 601 luma, red rounded to 0.2989)."""


@dataclass
class ViewParams:
    """Per-image random parameters of one view (N images), as drawn by ``BatchedView.sample`` (on the CPU)."""

    boxes: torch.Tensor  # N x 4 int64: top, left, height, width (as RandomResizedCrop)
    flip: torch.Tensor  # N bool
    jitter: torch.Tensor  # N bool: colour jitter applied
    factors: torch.Tensor  # N x 4 float: brightness, contrast, saturation, hue factors
    order: torch.Tensor  # N x 4 int64: a permutation of 0..3 (brightness, contrast, saturation, hue)
    gray: torch.Tensor  # N bool
    blur: torch.Tensor  # N bool
    sigma: torch.Tensor  # N float: blur sigma
    solarize: torch.Tensor  # N bool
    randaugment: RandAugmentParams  # N x L: InfoMin's RandAugment (L = 0 without it)

    def rows(self, start: int, stop: int) -> ViewParams:
        """The parameters of images ``start .. stop - 1`` (one rank's share of a global batch)."""
        return ViewParams(*(getattr(self, f.name)[start:stop] for f in fields(self)))


@dataclass
class ColourParams:
    """The per-image parameters of a view after its crop and flip (``BatchedView.sample_colour``): the fields of
    :class:`ViewParams` from ``jitter`` on, for views cropped elsewhere (``data.augment = "crop"``)."""

    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor
    randaugment: RandAugmentParams

    def rows(self, start: int, stop: int) -> ColourParams:
        return ColourParams(*(getattr(self, f.name)[start:stop] for f in fields(self)))


Params = TypeVar("Params", ViewParams, ColourParams, RandAugmentParams)


def cat_params(parts: Sequence[Params]) -> Params:
    """The parameters of several views' images one after the other (the ``count`` views of one ``[[views]]`` entry,
    augmented as one batch)."""
    first = parts[0]
    if len(parts) == 1:
        return first

    def joined(name: str) -> Any:
        values = [getattr(p, name) for p in parts]
        return torch.cat(values) if isinstance(values[0], torch.Tensor) else cat_params(values)

    return type(first)(*(joined(f.name) for f in fields(first)))


def crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``RandomResizedCrop.make_params`` for ``n`` images at once: N x 4 (top, left, height, width), int64.

    Ten attempts of (area fraction uniform in ``scale``, log aspect ratio uniform in log ``ratio``) per image; the
    first attempt that fits is kept, else the central crop with the aspect ratio clamped to ``ratio``.
    """
    area = torch.empty(n, 10, dtype=torch.float64).uniform_(scale[0], scale[1], generator=generator) * height * width
    log_r = torch.empty(n, 10, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    w = torch.sqrt(area * log_r.exp()).round()
    h = torch.sqrt(area / log_r.exp()).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)  # first fitting attempt (0 where none fits)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    u = torch.rand(n, 2, dtype=torch.float64, generator=generator)
    top = torch.minimum((u[:, 0] * (height - h + 1)).floor(), height - h)  # randint(0, height - h + 1)
    left = torch.minimum((u[:, 1] * (width - w + 1)).floor(), width - w)
    # fallback: central crop, aspect ratio clamped to [ratio[0], ratio[1]] (python round == torch.round: half-even)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=torch.float64)
    boxes = torch.where(found[:, None], torch.stack([top, left, h, w], 1), fallback)
    return boxes.long()


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``boxes`` (M x 4: top, left, height, width) out of float ``images`` (N, M a multiple of N: box i is cut
    from image i mod N, so several views' boxes come out one after the other) and resize each to size x size."""
    top, left, h, w = boxes.to(images.device, images.dtype).unbind(1)
    index = (torch.arange(len(boxes), device=images.device) % max(1, len(images))).to(images.dtype)
    rois = torch.stack([index, left, top, left + w, top + h], 1)
    return roi_align(images, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """N x 1 x H x W luma, as torchvision's ``rgb_to_grayscale`` on float images."""
    r, g, b = images.unbind(1)
    return (r * LUMA[0] + g * LUMA[1] + b * LUMA[2]).unsqueeze(1)


def adjust_hue(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-image hue shift (``factor``: N values in [-0.5, 0.5]) through HSV, as torchvision's ``adjust_hue``.

    A hue shift keeps each pixel's value V = max and chroma C = max - min (V x S), so the round trip is done in
    those terms: the hue in sixths of the circle, h6 = (g - b) / C where red is largest, 2 + (b - r) / C where green,
    else 4 + (r - g) / C, turned by 6 x factor, and channel n in (R, G, B) = V - C clamp(min(k, 4 - k), 0, 1) with
    k = (n + h6) mod 6, n = 5, 3, 1. Grey pixels (C = 0) come back unchanged.
    """
    maxc, minc = images.amax(1, keepdim=True), images.amin(1, keepdim=True)
    r, g, b = images.split(1, dim=1)
    chroma = maxc - minc
    red, green = maxc == r, maxc == g
    rise = torch.where(red, g - b, torch.where(green, b - r, r - g))  # 0 on grey pixels: r = g = b
    sextant = torch.where(red, 0.0, torch.where(green, 2.0, 4.0)) + 6.0 * factor.view(-1, 1, 1, 1).to(images)
    h6 = rise.div_(chroma.clamp_min(torch.finfo(images.dtype).tiny)).add_(sextant)
    k = (h6 + torch.tensor([5.0, 3.0, 1.0], device=images.device).view(1, 3, 1, 1)).remainder_(6.0)
    return maxc - chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def color_jitter_(
    images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, apply: torch.Tensor, hue: bool = True
) -> torch.Tensor:
    """torchvision's ``ColorJitter`` with per-image factors (N x 4) and op order (N x 4), where ``apply`` (N bool),
    in place on float ``images`` (returned).

    Brightness, contrast and saturation are the blend ``clamp(f x + (1 - f) ref, 0, 1)`` with ref 0, the mean of
    the image's grayscale, and the grayscale; the ops at one position of the order are done together as one blend
    with a per-image ref. The (costlier) hue op runs only on the images that have it at that position: pass the
    parameters on the CPU to pick them without a device sync. ``hue=False`` skips it (torchvision's ``hue=0``).
    """
    n, device = len(images), images.device
    for position in range(4):
        op = order[:, position]
        f = factors.gather(1, op.clamp(max=2).view(n, 1))[:, 0]
        f = torch.where(apply & (op < 3), f, 1.0).to(device).view(n, 1, 1, 1)  # f = 1: exactly the identity
        ref = None  # brightness blends towards black
        if (apply & (op > 0) & (op < 3)).any():
            gray = grayscale(images)
            contrast = (op == 1).to(device).view(n, 1, 1, 1)
            ref = torch.where((op == 2).to(device).view(n, 1, 1, 1), gray, gray.mean((2, 3), keepdim=True) * contrast)
        images.mul_(f)
        if ref is not None:
            images.add_(ref.mul_(1.0 - f))
        images.clamp_(0.0, 1.0)
        picked = (apply & (op == 3)).nonzero().squeeze(1)
        if hue and len(picked):
            images[picked.to(device)] = adjust_hue(images[picked.to(device)], factors[picked, 3].to(device))
    return images


def gaussian_blur(images: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` with a per-image sigma (N values); reflect padding.

    Separable: one grouped 1-D convolution per axis.
    """
    n, c, _, _ = images.shape
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, kernel_size, dtype=images.dtype, device=images.device)
    kernel = torch.softmax(-((x / sigma.view(n, 1)) ** 2), dim=1).repeat_interleave(c, 0)  # (N * C) x k
    pad = kernel_size // 2
    out = F.pad(images.reshape(1, n * c, *images.shape[2:]), [pad, pad, pad, pad], mode="reflect")
    out = F.conv2d(out, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    out = F.conv2d(out, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return out.view_as(images)


class BatchedView:
    """One ``[[views]]`` entry applied to a batch: uint8 (or float in [0, 1]) N x 3 x H x W -> float N x 3 x S x S.

    ``sample(n, height, width, generator)`` draws the random parameters on the CPU (``generator``: a CPU
    ``torch.Generator``, or None for torch's global one), ``apply(images, params)`` runs the chain with them on the
    images' device; calling the view does both. All images of a batch share one H x W. ``sample_colour`` and
    ``finish`` are the part of the chain after crop and flip, for images already cropped to the view's size.
    """

    def __init__(self, view: ViewConfig, mean: Sequence[float], std: Sequence[float]) -> None:
        self.view = view
        self.strengths = view.jitter()
        self.jitter_prob = view.jitter_prob if any(self.strengths.values()) else 0.0
        self.kernel_size = blur_kernel_size(view.size)
        self.fill = torch.tensor(fill_colour(mean), dtype=torch.float32) / 255  # RandAugment's geometric ops
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)

    def sample(self, n: int, height: int, width: int, generator: torch.Generator | None = None) -> ViewParams:
        v = self.view
        boxes = crop_boxes(n, height, width, v.scale, v.ratio, generator)
        flip = torch.rand(n, generator=generator) < v.hflip_prob
        c = self.sample_colour(n, generator)
        return ViewParams(boxes, flip, *(getattr(c, f.name) for f in fields(c)))

    def sample_colour(self, n: int, generator: torch.Generator | None = None) -> ColourParams:
        """The parameters after crop and flip (drawn by ``sample`` right after the boxes and flips)."""
        v, s = self.view, self.strengths

        def coin(p: float) -> torch.Tensor:
            return torch.rand(n, generator=generator) < p

        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.empty(n).uniform_(low, high, generator=generator)

        jitter = coin(self.jitter_prob)
        factors = torch.stack(
            [uniform(max(0.0, 1.0 - s[k]), 1.0 + s[k]) for k in ("brightness", "contrast", "saturation")]
            + [uniform(-s["hue"], s["hue"])],
            1,
        )
        order = torch.rand(n, 4, generator=generator).argsort(1)  # a uniform random permutation per image
        gray = coin(v.grayscale_prob)
        blur = coin(v.blur_prob)
        sigma = uniform(v.blur_sigma[0], v.blur_sigma[1])
        solarize = coin(v.solarize_prob)
        randaugment = sample_randaugment(v, n, generator)  # draws nothing without RandAugment
        return ColourParams(jitter, factors, order, gray, blur, sigma, solarize, randaugment)

    def apply(self, images: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """The chain with explicit parameters (tested against torchvision's functional ops image by image)."""
        x = resized_crop(_as_float(images), params.boxes, self.view.size)
        flipped = _rows(params.flip, x.device)
        if len(flipped):
            x[flipped] = x[flipped].flip(-1)
        return self._finish_(x, params)

    def finish(self, images: torch.Tensor, params: ViewParams | ColourParams) -> torch.Tensor:
        """The chain after crop and flip (jitter, grey, blur, solarize, normalise) on uint8 or [0, 1] float images
        already at the view's size, with explicit parameters (``images`` are left as they are)."""
        x = _as_float(images)
        return self._finish_(x.clone() if x is images else x, params)

    def _finish_(self, x: torch.Tensor, params: ViewParams | ColourParams) -> torch.Tensor:
        """``finish`` in place on float ``x``: every op writes into ``x`` (a fresh tensor is one more pass over the
        batch and, at CIFAR sizes on the CPU, fresh pages to fault in); on the CPU chunk by chunk."""
        step = max(1, CPU_CHUNK_ELEMENTS // max(1, x[0].numel())) if len(x) else 1
        if x.device.type != "cpu" or len(x) <= step:
            return self._finish_chunk_(x, params)
        for i in range(0, len(x), step):
            self._finish_chunk_(x[i : i + step], params.rows(i, i + step))
        return x

    def _finish_chunk_(self, x: torch.Tensor, params: ViewParams | ColourParams) -> torch.Tensor:
        device = x.device
        if params.jitter.any():
            color_jitter_(x, params.factors, params.order, params.jitter, hue=self.strengths["hue"] > 0)
        randaugment = self.view.randaugment != "none"
        if not randaugment:
            _gray_(x, _rows(params.gray, device))
        blurred = _rows(params.blur, device)
        if len(blurred):
            x[blurred] = gaussian_blur(x[blurred], self.kernel_size, params.sigma[params.blur].to(device))
        if randaugment:  # InfoMin's order: blur, RandAugment, grey
            x.copy_(randaugment_batch(x, params.randaugment, self.fill))
            _gray_(x, _rows(params.gray, device))
        solarized = _rows(params.solarize, device)
        if len(solarized):
            y = x[solarized]
            x[solarized] = torch.where(y >= 128 / 255, 1.0 - y, y)
        return x.sub_(self.mean.to(device)).div_(self.std.to(device))

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, _, height, width = images.shape
        return self.apply(images, self.sample(n, height, width, generator))


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def _rows(flags: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The indices where the per-image ``flags`` (on the CPU) are set, on ``device`` (no device sync)."""
    return flags.nonzero().squeeze(1).to(device)


def _gray_(x: torch.Tensor, rows: torch.Tensor) -> None:
    """Images ``rows`` of ``x`` to grayscale in place."""
    if len(rows):
        x[rows] = grayscale(x[rows]).expand(-1, 3, -1, -1)


class BatchedMultiView:
    """A batch into the recipe's list of view batches (``count`` of each ``[[views]]`` entry, as ``MultiView``).

    The ``count`` views of one entry are augmented as one batch of ``count`` x N images (their parameters drawn
    view after view, as for separate views): the same views, with each op's fixed cost paid once per entry (SwAV's
    6 local crops, DINO's 8) instead of once per view."""

    def __init__(self, views: Sequence[ViewConfig], mean: Sequence[float], std: Sequence[float]) -> None:
        self.entries = [(BatchedView(v, mean, std), v.count) for v in views]

    def __len__(self) -> int:
        return sum(count for _, count in self.entries)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return self.share(images, generator, len(images), 0)

    def share(
        self, images: torch.Tensor, generator: torch.Generator | None, total: int, start: int
    ) -> list[torch.Tensor]:
        """Views of ``images``, rows ``start ..`` of a global batch of ``total`` images: the parameters are drawn
        for the whole global batch, so every process of a multi-process run draws the same ones and applies its
        slice (one process with the global batch gets the same views)."""
        n, _, height, width = images.shape
        x, out = _as_float(images), []
        for view, count in self.entries:
            drawn = [view.sample(total, height, width, generator).rows(start, start + n) for _ in range(count)]
            out += view.apply(x, cat_params(drawn)).tensor_split(count)
        return out

    def finish_share(
        self, views: list[torch.Tensor], generator: torch.Generator, total: int, start: int
    ) -> list[torch.Tensor]:
        """The chain after crop and flip for views already cropped (uint8, one tensor per view at its size), rows
        ``start ..`` of a global batch of ``total`` images, drawn for the whole global batch as ``share`` does."""
        if len(views) != len(self):
            raise ValueError(f"finish_share: {len(views)} cropped views for the recipe's {len(self)}")
        out, first = [], 0
        for view, count in self.entries:
            crops, first = views[first : first + count], first + count
            drawn = [view.sample_colour(total, generator).rows(start, start + len(crops[0])) for _ in range(count)]
            joined = _as_float(torch.cat(crops))  # a new tensor: the chain may write into it
            out += view._finish_(joined, cat_params(drawn)).tensor_split(count)
        return out
