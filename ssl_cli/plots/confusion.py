"""Confusion matrices: counts from predictions, and a PNG of the row-normalised matrix (PIL, no matplotlib).

``confusion_matrix(predicted, labels, C)[t, p]`` counts the images of true class ``t`` predicted as ``p``.
``render_confusion`` draws it with one row per true class and one column per predicted class; every row is divided
by its sum (the diagonal is then the per-class accuracy, a row of a class absent from the data stays 0), cells are
shaded from white (0) to dark blue (1) and hold their value with two decimals. Class names label the rows (left) and
the columns (below, vertical); a colour bar on the right gives the scale. With many classes the cells get smaller:
the numbers are left out below 30 pixels per cell and the names below 9.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ssl_cli.artifacts.atomic import atomic_write

# matplotlib's "Blues", sampled at 0, 1/4, ..., 1; interpolated linearly
_BLUES = np.array([[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]], dtype=np.float64)
_INK = (34, 34, 34)
_GRID = (200, 200, 200)
PAD = 14


def confusion_matrix(predicted: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``(C, C)`` int64 counts: row = true class, column = predicted class."""
    predicted = predicted.to("cpu", torch.int64).flatten()
    labels = labels.to("cpu", torch.int64).flatten()
    if predicted.shape != labels.shape:
        raise ValueError(f"predicted and labels differ in length: {predicted.numel()} vs {labels.numel()}")
    flat = labels * num_classes + predicted
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def row_normalised(counts: Tensor) -> Tensor:
    """Every row divided by its sum (float64); rows without images stay 0."""
    counts = counts.to(torch.float64)
    totals = counts.sum(dim=1, keepdim=True)
    return torch.where(totals > 0, counts / totals.clamp(min=1), torch.zeros_like(counts))


def per_class_accuracy(counts: Tensor) -> list[float | None]:
    """The diagonal of the row-normalised matrix; ``None`` for a class with no images."""
    totals = counts.sum(dim=1)
    return [float(counts[i, i]) / float(totals[i]) if totals[i] > 0 else None for i in range(counts.shape[0])]


def _colour(value: float) -> tuple[int, int, int]:
    x = min(max(value, 0.0), 1.0) * (len(_BLUES) - 1)
    i = min(int(x), len(_BLUES) - 2)
    rgb = _BLUES[i] + (x - i) * (_BLUES[i + 1] - _BLUES[i])
    return tuple(int(round(c)) for c in rgb)  # type: ignore[return-value]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - left), int(bottom - top)


def _vertical_text(text: str, font) -> Image.Image:
    """``text`` rotated to read from bottom to top, black on transparent."""
    w, h = _text_size(font, text)
    left, top, _, _ = font.getbbox(text)
    strip = Image.new("RGBA", (w + 2, h + 2), (255, 255, 255, 0))
    ImageDraw.Draw(strip).text((1 - left, 1 - top), text, font=font, fill=(*_INK, 255))
    return strip.rotate(90, expand=True)


def render_confusion(counts: Tensor, classes: Sequence[str], title: Sequence[str] = ()) -> Image.Image:
    """The row-normalised confusion matrix as an RGB image (see the module doc)."""
    n = counts.shape[0]
    values = row_normalised(counts)
    cell = max(3, min(60, 900 // max(n, 1)))
    numbers, names = cell >= 30, cell >= 9
    number_font = _font(max(9, min(16, cell // 4 + 1)))
    label_font = _font(max(8, min(15, cell - 2)))
    title_font, axis_font = _font(16), _font(14)

    label_w = max((_text_size(label_font, c)[0] for c in classes), default=0) if names else 0
    line_h = _text_size(title_font, "Ag")[1] + 6
    axis_h = _text_size(axis_font, "Ag")[1]
    grid = cell * n
    x0 = PAD + axis_h + 10 + label_w + 8
    y0 = PAD + len(title) * line_h + (8 if title else 0)
    bar_w, tick_w = 16, _text_size(axis_font, "0.5")[0]
    width = max(
        x0 + grid + 24 + bar_w + 6 + tick_w + PAD,
        PAD * 2 + max((_text_size(title_font, t)[0] for t in title), default=0),
    )
    height = y0 + grid + 8 + label_w + 10 + axis_h + PAD

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(title):
        draw.text((PAD, PAD + i * line_h), line, font=title_font, fill=_INK)

    for t in range(n):
        for p in range(n):
            v = float(values[t, p])
            box = (x0 + p * cell, y0 + t * cell, x0 + (p + 1) * cell - 1, y0 + (t + 1) * cell - 1)
            draw.rectangle(box, fill=_colour(v), outline=_GRID if cell >= 12 else None)
            if numbers:
                text = "0" if counts[t, p] == 0 else f"{v:.2f}"
                w, h = _text_size(number_font, text)
                left, top, _, _ = number_font.getbbox(text)
                fill = (255, 255, 255) if v > 0.55 else _INK
                draw.text(
                    (box[0] + (cell - w) / 2 - left, box[1] + (cell - h) / 2 - top), text, font=number_font, fill=fill
                )
    draw.rectangle((x0 - 1, y0 - 1, x0 + grid, y0 + grid), outline=_INK)

    if names:
        for i, name in enumerate(classes):
            w, h = _text_size(label_font, name)
            left, top, _, _ = label_font.getbbox(name)
            draw.text((x0 - 8 - w - left, y0 + i * cell + (cell - h) / 2 - top), name, font=label_font, fill=_INK)
            strip = _vertical_text(name, label_font)
            image.paste(strip, (x0 + i * cell + (cell - strip.width) // 2, y0 + grid + 8), strip)
    # axis titles: "true class" vertical on the left, "predicted class" centred below
    side = _vertical_text("true class", axis_font)
    image.paste(side, (PAD, y0 + (grid - side.height) // 2), side)
    w, _ = _text_size(axis_font, "predicted class")
    draw.text((x0 + (grid - w) / 2, y0 + grid + 8 + label_w + 10), "predicted class", font=axis_font, fill=_INK)

    # colour bar: 1 at the top, 0 at the bottom
    bx = x0 + grid + 24
    for y in range(grid):
        draw.line((bx, y0 + y, bx + bar_w - 1, y0 + y), fill=_colour(1.0 - y / max(grid - 1, 1)))
    draw.rectangle((bx - 1, y0 - 1, bx + bar_w, y0 + grid), outline=_INK)
    for value, text in ((1.0, "1"), (0.5, "0.5"), (0.0, "0")):
        _, h = _text_size(axis_font, text)
        y = y0 + (1.0 - value) * (grid - 1)
        draw.text((bx + bar_w + 6, min(max(y - h / 2 - 2, y0 - 2), y0 + grid - h - 2)), text, font=axis_font, fill=_INK)
    return image


def save_confusion_png(counts: Tensor, classes: Sequence[str], path: Path, title: Sequence[str] = ()) -> None:
    """Render and write the PNG atomically (a temporary file, then ``os.replace``)."""
    image = render_confusion(counts, classes, title)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
