"""Shared fixtures: small generated data and tiny recipes, so the suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from ssl_cli.data.demo import CLASSES, make_demo

# A tiny, fast training setup: timm's test ResNet at 32x32, small batches, no worker processes.
TINY = [
    ("backbone.name", "test_resnet"),
    ("views.*.size", 32),
    ("train.batch_size", 32),
    ("train.epochs", 1),
    ("train.checkpoint_every", 1),
    ("train.device", "cpu"),
    ("schedule.warmup_epochs", 0),
    ("data.num_workers", 0),
]


def tiny_method(name: str, *overrides) -> torch.nn.Module:
    """The recipe ``name`` on TINY settings plus ``overrides``, built with weights from torch seed 0."""
    from ssl_cli.config import load_recipe
    from ssl_cli.train.pretrain import build_method

    torch.manual_seed(0)
    return build_method(load_recipe(name, [*TINY, *overrides]))


def random_views(n: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """Two batches of ``n`` random 32x32 images (the two views of a training step)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 3, 32, 32, generator=g)]


def assert_one_line_error(pattern: str, build, *args, error: type[Exception] | None = None) -> None:
    """``build(*args)`` raises ``error`` (default RecipeError) matching ``pattern``, its message a single line."""
    from ssl_cli.errors import RecipeError

    with pytest.raises(error or RecipeError, match=pattern) as info:
        build(*args)
    assert "\n" not in str(info.value)


CUDA_TESTS_DEVICE = "SSL_CUDA_TESTS_DEVICE"
"""Set to ``cpu`` by ``benchmarks/gpu_check.py --dry-run``: the ``cuda`` tests then run on the CPU (tiny shapes), so the
GPU check cannot rot between the runs on a GPU."""


def cuda_test_device() -> torch.device:
    """The device of a test marked ``cuda`` (``pytest -m cuda``): CUDA; without it the test is skipped, except under
    ``SSL_CUDA_TESTS_DEVICE=cpu`` (the GPU check's dry run), where it runs on the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get(CUDA_TESTS_DEVICE) == "cpu":
        return torch.device("cpu")
    pytest.skip("no CUDA device (pytest -m cuda runs these on a GPU; benchmarks/gpu_check.py --dry-run on the CPU)")


@pytest.fixture
def gpu() -> torch.device:
    """``cuda_test_device()`` for a test."""
    return cuda_test_device()


@pytest.fixture(autouse=True)
def _threads():
    """One torch thread per test process: avoids oversubscription when tests run beside other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _feature_cache(tmp_path_factory, monkeypatch):
    """The evaluation commands cache features under $XDG_CACHE_HOME: tests keep theirs out of the user's home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


def write_image_folder(
    root: Path, per_class: int = 8, classes: int = 3, split: str = "train", ext: str = "png"
) -> Path:
    """An ImageFolder of demo images: root/<class>/<n>.<ext>."""
    images, labels = make_demo(split, num_images=per_class * len(CLASSES))
    for c in range(classes):
        d = root / CLASSES[c]
        d.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images[labels == c][:per_class]):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i:03d}.{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images")
