"""Intermediate feature maps of any timm CNN during its ordinary forward: what AMDIM's loss reads besides the output.

``map_taps(backbone, size, targets)`` picks, for each target side length (AMDIM: 7 and 5), the layer among those
timm's ``feature_info`` names (the layers ``features_only`` / ``forward_intermediates`` return) whose map at the
input size is nearest to it, ties to the deeper layer; the sizes are measured with one forward in eval mode.
``capture_maps(backbone, taps)`` then records those layers' outputs with forward hooks while the backbone runs as
usual (``backbone(x)``), so a training step is one ordinary call of the backbone: the online classifier and
``ssl bench`` see it like any other method's.

With AMDIM's own encoder at its input size the picks are exactly its 7x7 and 5x5 layers (the last layer of each
size, as the reference's ``dim2layer``); with a stock ResNet at 32 px (timm stem) they are ``layer1`` (8x8) and
``layer2`` (4x4), at 224 px both ``layer4`` (7x7).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Tap:
    """One intermediate layer to read: its module name (timm's ``feature_info``), map size and channels."""

    module: str
    size: tuple[int, int]
    channels: int

    @property
    def locations(self) -> int:
        return self.size[0] * self.size[1]


def feature_modules(backbone: nn.Module) -> list[str]:
    """The module names of timm's ``feature_info`` (empty when the model has none)."""
    info = getattr(backbone, "feature_info", None)
    if isinstance(info, list):
        return [str(i["module"]) for i in info if isinstance(i, dict) and i.get("module")]
    return []


@contextlib.contextmanager
def capture_maps(backbone: nn.Module, modules: Sequence[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within the block, every call of ``backbone`` appends the output of each of ``modules`` to that module's list
    in the dict the block receives; the hooks are removed on exit."""
    maps: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            maps[name].append(output)

        return record

    handles = [backbone.get_submodule(name).register_forward_hook(hook(name)) for name in maps]
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def measure_maps(backbone: nn.Module, size: int) -> dict[str, tuple[int, ...]]:
    """The output shape (without the batch) of every ``feature_info`` layer for one ``size`` x ``size`` image, from a
    forward in eval mode without gradients (no BatchNorm statistics move, no random stream is drawn from)."""
    names = feature_modules(backbone)
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    in_chans = int(getattr(backbone, "in_chans", 0) or _in_channels(backbone))
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad(), capture_maps(backbone, names) as maps:
            backbone(torch.zeros(1, in_chans, size, size, device=device))
    finally:
        backbone.train(was_training)
    return {name: tuple(out[0].shape[1:]) for name, out in maps.items() if out and isinstance(out[0], torch.Tensor)}


def _in_channels(backbone: nn.Module) -> int:
    first = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


def map_taps(backbone: nn.Module, size: int, targets: Sequence[int]) -> list[Tap]:
    """For each target side length, the ``feature_info`` layer whose map at ``size`` px is nearest (ties: the deeper
    one). Raises ValueError when the backbone has no ``feature_info`` with N x C x H x W maps (a ViT's are tokens)."""
    shapes = {name: shape for name, shape in measure_maps(backbone, size).items() if len(shape) == 3}
    if not shapes:
        raise ValueError("its timm feature_info names no layer with N x C x H x W feature maps (a CNN is needed)")
    taps = []
    for target in targets:
        distance = {name: abs(h - target) + abs(w - target) for name, (_, h, w) in shapes.items()}
        nearest = min(distance.values())
        name = [n for n in shapes if distance[n] == nearest][-1]  # the deepest of the nearest
        channels, h, w = shapes[name]
        taps.append(Tap(name, (h, w), channels))
    return taps
