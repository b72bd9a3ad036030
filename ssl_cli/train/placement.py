"""Where and how a method's networks run: the device, the memory format (``train.channels_last``) and
``torch.compile`` (``train.compile``). The same for ``ssl pretrain`` and ``ssl bench``, so a benchmark measures what
training runs."""

from __future__ import annotations

import torch
from torch import nn

from ssl_cli.config.schema import TrainConfig
from ssl_cli.methods import Method

# torch.compile's backend for train.compile (a test may swap in "eager": the wiring without the compiler's minutes)
COMPILE_BACKEND = "inductor"


def memory_format(train: TrainConfig) -> torch.memory_format:
    """The layout of every image batch and convolution weight: channels-last (NHWC) or PyTorch's default (NCHW)."""
    return torch.channels_last if train.channels_last else torch.contiguous_format


def encoders(method: Method) -> dict[str, nn.Module]:
    """The backbone and every momentum copy of it (the method's children of the backbone's type), by attribute."""
    kind = type(method.backbone)
    return {name: m for name, m in method.named_children() if m is method.backbone or type(m) is kind}


def place(method: Method, train: TrainConfig, device: torch.device) -> Method:
    """``method`` on ``device``, in ``train.channels_last``'s layout, its encoders compiled with ``train.compile``.

    Compiling works in place (``nn.Module.compile``): parameter names, checkpoints and exports are those of the
    uncompiled network. The heads and losses stay eager: they are a small part of the arithmetic and hold the
    methods' Python-side state (queues, centres, banks)."""
    method = method.to(device)
    if train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if train.compile:
        for module in encoders(method).values():
            module.compile(backend=COMPILE_BACKEND)
    return method
