"""Full-precision regions inside a bf16 autocast step: where the losses compute logits, softmaxes and Sinkhorn.

Under autocast every matmul runs in bf16 whatever its inputs' dtype, so a ``.float()`` cast alone changes
nothing. bf16 keeps 8 significant bits (rounding moves a value by up to 2^-8, 0.4%): a cosine of 0.9 is off
by up to 3.5e-3, and dividing by a temperature of 0.1 turns that into an error of 3.5e-2 in the logit before
the exp (NT-Xent's gradient at tau 0.1 comes out about 1-2% off). Every similarity / logit / softmax / Sinkhorn of the
losses therefore runs in an fp32 region: autocast off on the inputs' devices, half-precision inputs cast to
fp32 inside it. The backbone and the heads keep running in bf16; only these small products pay for fp32.

As the PyTorch autocast documentation recommends ([0], ``torch.autocast``: "autocast(enabled=False) subregions
can be nested in autocast-enabled regions ... inputs from the surrounding region should be cast to dtype before
use").

[0] PyTorch, Automatic Mixed Precision, https://pytorch.org/docs/stable/amp.html (torch.autocast, "Locally
    disabling autocast").
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

_HALF = (torch.float16, torch.bfloat16)


def to_fp32(x: Any) -> Any:
    """``x`` with every fp16 / bf16 tensor (also inside lists, tuples and dicts) cast to fp32; fp32 and fp64
    tensors, and anything else, unchanged."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.dtype in _HALF else x
    if type(x) in (list, tuple):  # plain containers only (a named tuple is returned as it is)
        return type(x)(to_fp32(v) for v in x)
    if isinstance(x, dict):
        return {k: to_fp32(v) for k, v in x.items()}
    return x


def _device_types(x: Any, found: set[str]) -> set[str]:
    if isinstance(x, torch.Tensor):
        found.add(x.device.type)
    elif type(x) in (list, tuple):
        for v in x:
            _device_types(v, found)
    elif isinstance(x, dict):
        for v in x.values():
            _device_types(v, found)
    return found


@contextlib.contextmanager
def full_precision(*devices: torch.device | str | torch.Tensor) -> Iterator[None]:
    """Autocast off for the device types of ``devices`` (devices, type names such as ``"cuda"``, or tensors).

    Casting the region's half-precision inputs is the caller's part (``to_fp32``); ``fp32`` does both.
    """
    types = set()
    for d in devices:
        types.add(d.device.type if isinstance(d, torch.Tensor) else torch.device(d).type)
    with contextlib.ExitStack() as stack:
        for t in sorted(types):
            stack.enter_context(torch.autocast(device_type=t, enabled=False))
        yield


def fp32(fn: F) -> F:
    """Decorator: ``fn`` runs with autocast off on the devices of its tensor arguments, which arrive with fp16 /
    bf16 tensors cast to fp32 (in lists and tuples too). Gradients still flow to the callers' bf16 tensors."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        types = _device_types(kwargs, _device_types(args, set()))
        with full_precision(*types):
            return fn(*to_fp32(args), **to_fp32(kwargs))

    return wrapper  # type: ignore[return-value]
