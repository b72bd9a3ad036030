"""Terminal plumbing shared by the commands: stderr console, progress, errors, ``--json`` output."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ssl_cli.errors import SSLError

# soft_wrap: a message is one line however long (no hard wrapping at the 80 columns assumed off a terminal)
err = Console(stderr=True, highlight=False, soft_wrap=True)
stdout = Console(highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: MESSAGE`` as exactly one line on stderr; returns the ``typer.Exit`` to raise."""
    message = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    if err.is_terminal:  # the message itself is never read as markup: "[method]" stays as written
        err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    else:
        err.print(f"error: {message}", markup=False, soft_wrap=True)
    return typer.Exit(code)


def handles_errors(fn: F) -> F:
    """User errors become one line on stderr and their exit code; Ctrl-C exits 130; no tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SSLError as e:
            raise fail(str(e), e.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except MemoryError:
            raise fail("out of memory; lower --batch-size", 1) from None
        except Exception as e:  # noqa: BLE001 - a bug, not bad input: one line unless debugging
            if os.environ.get("SSL_DEBUG"):
                raise
            raise fail(f"internal error: {type(e).__name__}: {e} (set SSL_DEBUG=1 for the traceback)", 1) from None

    return wrapper  # type: ignore[return-value]


def emit_json(payload: dict[str, Any]) -> None:
    """Exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def result_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in rows.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


class ProgressReporter:
    """A Rich progress bar on stderr (epoch/step, loss, lr, images/s, ETA) plus one line per epoch."""

    STANDARD = ("loss", "lr", "images_per_second")
    LOG_INTERVAL_S = 30.0
    """Without a terminal (logs, CI) the bar is hidden; a plain progress line is printed this often instead."""

    def __init__(self, epochs: int | None = None, quiet: bool = False) -> None:
        self.epochs = epochs
        self.quiet = quiet
        self.total = 0
        self.last_line = time.monotonic()
        self.started = time.monotonic()
        self.start_step = 0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err,
            transient=True,
            disable=quiet or not err.is_terminal,
        )
        self.task = None

    def __enter__(self) -> ProgressReporter:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def start(self, total_steps: int, done_steps: int, epochs: int | None = None) -> None:
        self.epochs = epochs or self.epochs
        self.total, self.start_step, self.started = total_steps, done_steps, time.monotonic()
        self.task = self.progress.add_task("pretrain", total=total_steps, completed=done_steps, stats="")

    def update(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        stats = f"loss {metrics['loss']:.4f}  lr {metrics['lr']:.3g}  {metrics['images_per_second']:.0f} img/s"
        stats += self._extra(metrics)
        self.progress.update(self.task, completed=step, description=f"epoch {epoch + 1}/{self.epochs}", stats=stats)
        now = time.monotonic()
        if not self.quiet and self.progress.disable and now - self.last_line >= self.LOG_INTERVAL_S:
            self.last_line = now
            rate = (step - self.start_step) / max(now - self.started, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            line = f"epoch {epoch + 1}/{self.epochs}  step {step}/{self.total}  {stats}  ETA {eta:.0f}s"
            err.print(line, markup=False)

    def _extra(self, values: dict[str, Any]) -> str:
        """The method's own monitors (e.g. MoCo's contrastive_acc), after the standard fields."""
        skip = (*self.STANDARD, "epoch", "step", "seconds")
        return "".join(f"  {k} {v:.3g}" for k, v in values.items() if k not in skip)

    def epoch_end(self, record: dict[str, Any]) -> None:
        if not self.quiet:
            self.progress.console.print(
                f"epoch {record['epoch']}/{self.epochs}  step {record['step']}  loss {record['loss']:.4f}  "
                f"lr {record['lr']:.3g}  {record['images_per_second']:.0f} img/s  {record['seconds']:.1f}s"
                + self._extra(record),
                markup=False,
            )

    def log(self, message: str) -> None:
        if not self.quiet:
            self.progress.console.print(message, markup=False)


class CountProgress:
    """A simple bar for feature extraction / probe epochs (stderr, hidden when not a terminal)."""

    def __init__(self, description: str, total: int) -> None:
        self.progress = Progress(
            TextColumn(description),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
            disable=not err.is_terminal,
        )
        self.task = self.progress.add_task(description, total=total)

    def __enter__(self) -> CountProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)
