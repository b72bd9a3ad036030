"""What every command needs of the machine it runs on: the device, autocast, and a progress reporter."""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch

from ssl_cli.errors import RecipeError


class Reporter(Protocol):
    """Receives progress; the CLI draws a Rich progress bar on stderr, the library default is silent."""

    def start(self, total_steps: int, done_steps: int, epochs: int | None = None) -> None: ...
    def update(self, step: int, epoch: int, metrics: dict[str, float]) -> None: ...
    def epoch_end(self, record: dict[str, Any]) -> None: ...
    def log(self, message: str) -> None: ...


class SilentReporter:
    def start(self, total_steps: int, done_steps: int, epochs: int | None = None) -> None: ...
    def update(self, step: int, epoch: int, metrics: dict[str, float]) -> None: ...
    def epoch_end(self, record: dict[str, Any]) -> None: ...
    def log(self, message: str) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"train.device: '{name}' asked for but no CUDA device is available; use cpu or auto")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (``auto`` or ``bf16``); full fp32 on CPU unless ``bf16`` is forced."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
