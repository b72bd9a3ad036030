"""Nearest-neighbour retrieval grids: each query image followed by its K most similar bank images.

Similarity is the cosine of backbone features, the measure ``ssl knn`` votes with (InstDisc [0] and DINO [1]
show such retrievals). When the queries come from the bank itself, a query is left out of its own neighbours.

The picture (PIL only) has one row per query: the query in a blue frame, a gap, then its neighbours from the
most similar on, each framed green when its label equals the query's, red when it differs (grey when labels
are unknown), with the similarity and the class under it. ``GridLayout`` gives every tile's position.

[0] Unsupervised Feature Learning via Non-Parametric Instance Discrimination, Wu et al. 2018, Fig. 4.
[1] Emerging Properties in Self-Supervised Vision Transformers, Caron et al. 2021, Sec. 4.2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ssl_cli.data import ImageSet
from ssl_cli.errors import DataError
from ssl_cli.plots.files import write_atomic

QUERY = (40, 90, 220)
SAME = (0, 160, 60)
OTHER = (220, 30, 30)
UNKNOWN = (150, 150, 150)
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)

FRAME = 4
"""Frame width around every tile, in pixels."""
PAD = 6
"""Space between two tiles, and around the picture."""
QUERY_GAP = 14
"""Extra space between a query and its first neighbour."""
MIN_TILE = 96
"""Small images are enlarged (by a whole factor, nearest neighbour) to tiles at least this wide."""
FONT_SIZE = 12
CAPTION = 2 * (FONT_SIZE + 3) + 2
"""Two text lines under every tile: the similarity (or 'query'), then the class."""
HEADER = 2 * (FONT_SIZE + 4) + PAD
"""Two text lines above the grid."""


# --- neighbours -------------------------------------------------------------------------------------------


def nearest(
    queries: torch.Tensor, bank: torch.Tensor, k: int, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` bank rows most cosine-similar to each query row: (similarities, indices), both Q x k, most
    similar first. ``exclude`` (Q x bank bool, or None) marks bank entries a query may not return (itself)."""
    q = torch.nn.functional.normalize(queries.double(), dim=1)
    b = torch.nn.functional.normalize(bank.double(), dim=1)
    sim = q @ b.T
    if exclude is not None:
        sim = sim.masked_fill(exclude, -math.inf)
    values, indices = sim.topk(k, dim=1)
    return values.float(), indices


def self_mask(query_index: torch.Tensor, bank_size: int) -> torch.Tensor:
    """Q x bank: True where the bank entry is the query itself (``query_index``: each query's bank index, -1 for
    a query that is not in the bank)."""
    mask = torch.zeros(len(query_index), bank_size, dtype=torch.bool)
    inside = query_index >= 0
    mask[torch.nonzero(inside).flatten(), query_index[inside]] = True
    return mask


# --- the picture ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a grid of ``rows`` x ``cols`` tiles of ``tile`` pixels (column 0: the queries)."""

    rows: int
    cols: int
    tile: int

    @property
    def box(self) -> int:
        """A framed tile's side."""
        return self.tile + 2 * FRAME

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """(x, y) of the framed tile's top-left pixel (the frame's outer corner)."""
        x = PAD + col * (self.box + PAD) + (QUERY_GAP if col > 0 else 0)
        y = HEADER + row * (self.box + CAPTION + PAD)
        return x, y

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the picture."""
        x, y = self.origin(self.rows - 1, self.cols - 1)
        return x + self.box + PAD, y + self.box + CAPTION + PAD


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:  # pragma: no cover - older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text``, cut with an ellipsis to ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _tile(pixels: np.ndarray, tile: int) -> Image.Image:
    im = Image.fromarray(pixels)
    if im.size == (tile, tile):
        return im
    whole = tile % im.size[0] == 0 and tile % im.size[1] == 0
    return im.resize((tile, tile), Image.Resampling.NEAREST if whole else Image.Resampling.LANCZOS)


def frame_color(query_label: int, label: int) -> tuple[int, int, int]:
    if query_label < 0 or label < 0:
        return UNKNOWN
    return SAME if query_label == label else OTHER


def render_grid(
    queries: list[np.ndarray],
    neighbours: list[list[np.ndarray]],
    query_labels: list[int],
    neighbour_labels: list[list[int]],
    similarities: list[list[float]],
    query_names: list[str],
    neighbour_names: list[list[str]],
    header: list[str],
    tile: int,
) -> Image.Image:
    """The grid: per row a query (uint8 H x W x 3) and its neighbours, framed by label (-1: unknown) and captioned
    with the similarity and the class name (see the module doc)."""
    k = len(neighbours[0]) if neighbours else 0
    layout = GridLayout(len(queries), k + 1, tile)
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    width = layout.size[0] - 2 * PAD
    for i, line in enumerate(header[:2]):
        draw.text((PAD, PAD // 2 + i * (FONT_SIZE + 4)), _fit(draw, line, font, width), fill=TEXT, font=font)

    def put(row: int, col: int, pixels: np.ndarray, color, lines: list[str]) -> None:
        x, y = layout.origin(row, col)
        draw.rectangle([x, y, x + layout.box - 1, y + layout.box - 1], fill=color)
        canvas.paste(_tile(pixels, tile), (x + FRAME, y + FRAME))
        for j, text in enumerate(lines):
            text = _fit(draw, text, font, layout.box)
            tx = x + (layout.box - draw.textlength(text, font=font)) / 2
            draw.text((tx, y + layout.box + 2 + j * (FONT_SIZE + 3)), text, fill=TEXT, font=font)

    for r, query in enumerate(queries):
        put(r, 0, query, QUERY, ["query", query_names[r]])
        for c in range(k):
            color = frame_color(query_labels[r], neighbour_labels[r][c])
            put(r, c + 1, neighbours[r][c], color, [f"{similarities[r][c]:.3f}", neighbour_names[r][c]])
    return canvas


# --- the command ------------------------------------------------------------------------------------------


def _same_folder(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return a == b or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


def _bank_index(bank: ImageSet, queries: ImageSet) -> torch.Tensor:
    """Each query's index in the bank when it is the same file, else -1."""
    if bank.paths is None or queries.paths is None:
        return torch.full((len(queries),), -1, dtype=torch.long)
    where = {p.resolve(): i for i, p in enumerate(bank.paths)}
    return torch.tensor([where.get(p.resolve(), -1) for p in queries.paths], dtype=torch.long)


def _pick_queries(bank: Any, data: str, queries: str | None, from_bank: bool, num: int, seed: int, k: int):
    """A seeded, class-balanced sample of query images; with their indices in ``bank`` (-1: not in it), checked
    to leave ``k`` neighbours besides a query itself."""
    from ssl_cli.plots.embedding import balanced_sample
    from ssl_cli.plots.features import open_images

    query_set = bank if from_bank else open_images(queries, "--queries")
    picked = balanced_sample(query_set.labels, num, seed)
    if from_bank:
        query_index = picked.clone()
    else:
        query_set = query_set.subset(picked)
        query_index = _bank_index(bank, query_set)
    available = len(bank) - int((query_index >= 0).any())
    if k > available:
        itself = " besides the query itself" if (query_index >= 0).any() else ""
        raise DataError(
            f"--k {k}: the bank --data {data} has only {len(bank)} images, so at most {available} neighbours"
            f"{itself}; choose a smaller --k"
        )
    return query_set, picked, query_index


def _legend(q_labels: list[int], n_labels: list[list[int]], precision: float | None) -> str:
    if precision is None:
        return "frame: blue = query, grey = neighbour (no labels to compare)"
    unknown = any(q < 0 for q in q_labels) or any(n < 0 for row in n_labels for n in row)
    legend = "frame: blue = query, green = same class, red = other class" + (", grey = unknown" if unknown else "")
    return legend + f"; {precision:.1%} of the neighbours share the query's class"


def retrieval_grid(
    checkpoint: str | Path,
    data: str,
    out: Path,
    queries: str | None = None,
    num_queries: int = 8,
    k: int = 8,
    seed: int = 0,
    batch_size: int = 256,
    num_workers: int | str = "auto",
    device: str = "auto",
    random_init: bool = False,
    output_view: str | None = None,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Features of the bank ``data`` and of a seeded, class-balanced sample of ``num_queries`` query images (from
    ``queries``, default the bank itself) -> each query's ``k`` nearest bank images -> the grid PNG at ``out``.

    Returns ``queries`` (path, class, neighbours with path, class, similarity), ``precision`` (the share of
    neighbours of the query's class, None without labels) and ``out``."""
    from ssl_cli.plots.features import class_name, encode, image_name, load_encoder, open_images, shown_pixels

    if k < 1:
        raise DataError(f"--k {k}: must be 1 or more")
    if num_queries < 1:
        raise DataError(f"--num-queries {num_queries}: must be 1 or more")
    encoder = load_encoder(checkpoint, device, random_init, output_view)
    bank = open_images(data)
    from_bank = queries is None or _same_folder(queries, data)
    query_set, picked, query_index = _pick_queries(bank, data, queries, from_bank, num_queries, seed, k)
    listed = bank  # the files, for the names: a decoded set keeps only pixels
    bank = bank.cached("auto")
    if on_total:
        on_total(len(bank) + (0 if from_bank else len(query_set)))
    bank_f, bank_y = encode(encoder, bank, batch_size, num_workers, progress)
    if from_bank:
        query_f = bank_f[picked]
        shown_set, shown_listed, shown_idx = bank, listed, picked.tolist()
    else:
        query_f, _ = encode(encoder, query_set, batch_size, num_workers, progress)
        shown_set, shown_listed, shown_idx = query_set, query_set, list(range(len(query_set)))
    sims, idx = nearest(query_f, bank_f, k, self_mask(query_index, len(bank)))

    # labels compared by class name, so a query folder may hold other classes or list them in another order
    bank_label = {name: i for i, name in enumerate(bank.classes)} if bank.labeled else {}
    q_names = [class_name(shown_set, i) or "" for i in shown_idx]
    q_labels = [bank_label.get(name, -1) if shown_set.labeled else -1 for name in q_names]
    n_names = [[class_name(bank, j) or "" for j in row] for row in idx.tolist()]
    n_labels = [[int(bank_y[j]) if bank.labeled else -1 for j in row] for row in idx.tolist()]
    known = [(q, row) for q, row in zip(q_labels, n_labels, strict=True) if q >= 0]
    precision = float(np.mean([[q == n for n in row] for q, row in known])) if known and bank.labeled else None

    tile = encoder.size * max(1, math.ceil(MIN_TILE / encoder.size))
    weights = "random weights" if random_init else Path(checkpoint).name
    header = [
        f"{len(query_f)} queries from {shown_set.name}, each with its {k} nearest images in {bank.name} "
        f"(cosine similarity of {encoder.name} features, {weights})",
        _legend(q_labels, n_labels, precision),
    ]
    picture = render_grid(
        [shown_pixels(encoder, shown_set, i) for i in shown_idx],
        [[shown_pixels(encoder, bank, j) for j in row] for row in idx.tolist()],
        q_labels,
        n_labels,
        sims.tolist(),
        q_names,
        n_names,
        header,
        tile,
    )
    write_atomic(out, lambda tmp: picture.save(tmp, format="PNG"))
    rows = [
        {
            "path": image_name(shown_listed, i),
            "class": class_name(shown_set, i),
            "neighbors": [
                {"path": image_name(listed, j), "class": class_name(bank, j), "similarity": float(s)}
                for j, s in zip(idx[r].tolist(), sims[r].tolist(), strict=True)
            ],
        }
        for r, i in enumerate(shown_idx)
    ]
    return {
        "out": str(out),
        "k": k,
        "bank": bank.name,
        "bank_size": len(bank),
        "queries": rows,
        "precision": precision,
        "random_init": random_init,
        **({"output_view": output_view} if output_view is not None else {}),
        "size": list(picture.size),
    }
