"""Training curves from ``metrics.jsonl``: one panel per metric family, several runs overlaid for comparison.

``ssl pretrain`` appends one JSON object per epoch to ``<run>/metrics.jsonl``: ``epoch``, ``step``, ``loss``,
``lr``, ``images_per_second``, ``seconds``, the method's own monitors (MoCo's ``contrastive_acc``, BYOL's
``z_std``, SwAV's ``code_entropy``...) and online evaluation monitors. The panels:

- ``loss``: the training loss (the mean over the epoch);
- ``learning rate``: ``lr`` (its value at the epoch's last step);
- ``accuracy``: every key that names an accuracy (contains ``knn``, ``top1``, ``top5`` or ``acc``), together:
  the kNN and online-classifier monitors, a method's pretext accuracy (MoCo's ``contrastive_acc``);
- one panel for each other numeric key (a method's monitor, the online classifier's loss), since their scales
  differ.

``epoch``, ``step``, ``seconds`` and ``images_per_second`` are not plotted (throughput depends on what else ran).
A resumed run's file is deduplicated by the trainer; here too a repeated epoch keeps its last line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_cli.errors import CheckpointError, DataError
from ssl_cli.plots.files import write_atomic

X_AXES = ("epoch", "step")
NOT_PLOTTED = ("epoch", "step", "seconds", "images_per_second")
ACCURACY_WORDS = ("knn", "top1", "top5", "acc")
DPI = 100
PANEL_SIZE = (520, 360)
"""Default pixels per panel (width, height); the figure is a grid of panels plus the title."""
LOG_RATIO = 20.0
"""The loss panel turns logarithmic when its largest value is this many times its smallest (all positive)."""
MARKERS_UP_TO = 40
"""Points are marked on curves of at most this many points (a short run's epochs stay visible)."""


@dataclass
class RunMetrics:
    """One run's metric records, one per epoch (the last line of a repeated epoch), in epoch order."""

    name: str
    path: Path
    records: list[dict[str, float]]

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for record in self.records:
            seen.update(dict.fromkeys(record))
        return list(seen)

    def series(self, key: str, x: str) -> tuple[list[float], list[float]]:
        """(x values, values) of ``key`` over the records that hold both."""
        pts = [(r[x], r[key]) for r in self.records if x in r and key in r]
        return [p[0] for p in pts], [p[1] for p in pts]


@dataclass
class Panel:
    title: str
    ylabel: str
    keys: list[str] = field(default_factory=list)


def metrics_file(run: str | Path) -> Path:
    """A run folder's ``metrics.jsonl``, or the file itself."""
    path = Path(run).expanduser()
    if path.is_dir():
        if not (path / "metrics.jsonl").is_file():
            raise CheckpointError(f"{run}: no metrics.jsonl in this folder (a run folder of ssl pretrain holds one)")
        return path / "metrics.jsonl"
    if not path.is_file():
        raise CheckpointError(f"run not found: {run} (expected a run folder of ssl pretrain or its metrics.jsonl)")
    return path


def run_name(path: Path) -> str:
    """``runs/moco/metrics.jsonl`` -> ``moco``; ``simclr.metrics.jsonl`` -> ``simclr``."""
    if path.name == "metrics.jsonl":
        return path.resolve().parent.name
    name = path.name.removesuffix(".jsonl")
    return name.removesuffix(".metrics") or name


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_metrics(run: str | Path) -> RunMetrics:
    """Read a run's metric lines: numeric values only; a repeated epoch (or step, without epochs) keeps its last
    line; records sorted by epoch (else step)."""
    path = metrics_file(run)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    by_x: dict[tuple[str, float] | tuple[str, int], dict[str, float]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CheckpointError(
                f"{path}, line {n}: not JSON ({e.msg}); expected one JSON object per line, as ssl pretrain writes"
            ) from None
        if not isinstance(record, dict):
            raise CheckpointError(
                f"{path}, line {n}: a JSON {type(record).__name__}, not an object; expected one JSON object per "
                "line, as ssl pretrain writes"
            )
        values = {k: v for k, v in ((str(k), _number(v)) for k, v in record.items()) if v is not None}
        key = next(((x, values[x]) for x in X_AXES if x in values), ("line", n))
        by_x.pop(key, None)  # a repeated epoch: its last line wins (and takes the later place)
        by_x[key] = values
    if not by_x:
        raise CheckpointError(f"{path}: no metric records in this file (empty)")
    records = sorted(by_x.values(), key=lambda r: (r.get("epoch", math.inf), r.get("step", math.inf)))
    return RunMetrics(run_name(path), path, records)


def read_runs(runs: list[str | Path]) -> list[RunMetrics]:
    """Several runs; names made unique (``parent/name``, then a number) for the legend."""
    if not runs:
        raise CheckpointError("no run given: pass one or more run folders (or metrics.jsonl files)")
    read = [read_metrics(r) for r in runs]
    names = [r.name for r in read]
    for r in read:
        if names.count(r.name) > 1:
            in_run = r.path.name == "metrics.jsonl"
            r.name = f"{r.path.resolve().parent.parent.name}/{r.name}" if in_run else str(r.path)
    for i, r in enumerate(read):
        if [x.name for x in read].count(r.name) > 1:
            r.name = f"{r.name} ({i + 1})"
    return read


def is_accuracy(key: str) -> bool:
    return any(word in key.lower() for word in ACCURACY_WORDS)


def panels(runs: list[RunMetrics], x: str = "epoch") -> list[Panel]:
    """The panels for the union of the runs' keys: loss, learning rate, accuracy, then one per other metric."""
    keys: dict[str, None] = {}
    for r in runs:
        keys.update(dict.fromkeys(k for k in r.keys() if k not in NOT_PLOTTED))
    loss = Panel("loss", "loss (epoch mean)" if x == "epoch" else "loss")
    lr = Panel("learning rate", "learning rate (epoch end)" if x == "epoch" else "learning rate")
    accuracy = Panel("accuracy", "accuracy (fraction)")
    others: list[Panel] = []
    for key in keys:
        low = key.lower()
        if low == "loss":
            loss.keys.append(key)
        elif low == "lr":
            lr.keys.append(key)
        elif is_accuracy(key):
            accuracy.keys.append(key)
        else:
            others.append(Panel(key, key, [key]))
    accuracy.keys.sort()  # knn_top1 beside knn_top5, online_top1 beside online_val_top1...
    return [p for p in (loss, lr, accuracy) if p.keys] + sorted(others, key=lambda p: p.title)


PALETTE = [f"C{i}" for i in range(10)]
STYLES = ["-", "--", ":", "-.", (0, (7, 2, 2, 2, 2, 2)), (0, (12, 3))]  # six distinct line styles
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def _draw_panel(ax: Any, panel: Any, runs: list[RunMetrics], x: str) -> None:
    """One panel: every run's series of the panel's keys against ``x``."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    palette, styles, markers, several = PALETTE, STYLES, MARKERS, len(runs) > 1
    for ri, r in enumerate(runs):
        for ki, key in enumerate(panel.keys):
            xs, ys = r.series(key, x)
            if xs:
                ax.plot(
                    xs,
                    ys,
                    linestyle=styles[ki % len(styles)] if several else "-",
                    color=palette[(ri if several else ki) % len(palette)],
                    marker=markers[ki % len(markers)] if len(xs) <= MARKERS_UP_TO else None,
                    markersize=5,
                    linewidth=1.6,
                )
    ax.set_title(panel.title)
    ax.set_xlabel(x)
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    values = [v for r in runs for key in panel.keys for v in r.series(key, x)[1]]
    if panel.title == "loss" and values and min(values) > 0 and max(values) / min(values) > LOG_RATIO:
        ax.set_yscale("log")  # losses of different methods differ in scale by orders of magnitude
        ax.set_ylabel(f"{panel.ylabel}, log scale")
    if panel.title == "learning rate":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if len(panel.keys) > 1:
        # one run: a colour per key; several runs: colours are the runs (figure legend), line styles the keys
        handles = [
            Line2D([], [], linestyle=styles[i % len(styles)], marker=markers[i % len(markers)], color="0.3")
            if several
            else Line2D([], [], color=palette[i % len(palette)], marker=markers[i % len(markers)])
            for i in range(len(panel.keys))
        ]
        ax.legend(handles, panel.keys, fontsize="small", loc="best")


def plot_curves(
    runs: list[RunMetrics],
    out: Path,
    x_axis: str = "epoch",
    width: int | None = None,
    height: int | None = None,
) -> dict[str, Any]:
    """Draw the panels of ``runs`` into the PNG ``out`` (``width`` x ``height`` pixels; default by panel count)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if x_axis not in X_AXES:
        raise DataError(f"--x-axis {x_axis}: unknown; valid: {', '.join(X_AXES)}")
    for r in runs:
        if not any(x_axis in rec for rec in r.records):
            raise CheckpointError(f"--x-axis {x_axis}: {r.path} has no '{x_axis}' values (valid: {', '.join(X_AXES)})")
    shown = panels(runs, x_axis)
    if not shown:
        raise CheckpointError(f"{runs[0].path}: no metric to plot (only {', '.join(NOT_PLOTTED)})")
    cols = 1 if len(shown) == 1 else 2 if len(shown) <= 4 else 3
    rows = math.ceil(len(shown) / cols)
    several = len(runs) > 1
    width = width or cols * PANEL_SIZE[0]
    height = height or rows * PANEL_SIZE[1] + 60 + (30 if several else 0)
    if width < 200 or height < 150:
        raise DataError(f"--width {width} --height {height}: too small for a figure (at least 200 x 150 pixels)")

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    title = f"training curves: {runs[0].name}" if not several else f"training curves: {len(runs)} runs"
    fig.suptitle(title, fontsize="large")
    palette = PALETTE
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(shown) :]:
        ax.set_visible(False)
    for ax, panel in zip(axes, shown, strict=False):
        _draw_panel(ax, panel, runs, x_axis)
    if several:
        handles = [Line2D([], [], color=palette[i % len(palette)], marker="o") for i in range(len(runs))]
        fig.legend(handles, [r.name for r in runs], loc="outside lower center", ncols=min(len(runs), 6))
    write_atomic(out, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return {
        "out": str(out),
        "x_axis": x_axis,
        "panels": [{"title": p.title, "keys": p.keys} for p in shown],
        "runs": [
            {
                "name": r.name,
                "metrics": str(r.path),
                "records": len(r.records),
                "last": r.records[-1],
            }
            for r in runs
        ],
        "size": [width, height],
    }
