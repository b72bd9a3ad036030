"""Multi-process training on ``torch.distributed``: process-group set-up and the collectives the methods need.

``torchrun --nproc_per_node N -m ssl_cli pretrain ...`` starts N processes with ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` in their environment; :func:`init_from_env` joins them into one process group (NCCL on CUDA,
gloo on CPU). Without those variables every helper here is a no-op for one process, so the methods call them
unconditionally.

Gradient convention. DistributedDataParallel averages gradients over the ranks, so the loss being minimised
is the mean of the ranks' losses. The differentiable collectives below (:func:`gather_with_grad`,
:func:`all_reduce_with_grad`) therefore *sum* the incoming gradients over the ranks in their backward pass:
rank r's tensor then receives the gradient of the sum of all ranks' losses, which DDP's average turns into
the gradient of their mean. With this convention a step on W ranks x B samples equals a step on one process
with the W x B samples (tested in ``tests/train/test_distributed.py``).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ssl_cli.errors import RecipeError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_rank() -> int:
    """This process's rank from torchrun's environment (0 without torchrun), before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def init_from_env(device_name: str) -> DistEnv:
    """Join the process group torchrun describes (idempotent); one process without torchrun."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RecipeError(f"train.device: '{device_name}' asked for but no CUDA device is available; use cpu or auto")
    if want_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo", device_id=device if want_cuda else None)
    return DistEnv(rank, world, local_rank, device)


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel that leaves buffers alone after start-up: queues, memory banks and EMA encoders
    are kept identical by the methods' own collectives, and re-sending them before every forward would cost a
    queue-sized broadcast per step."""
    ids = [device.index] if device.type == "cuda" else None
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:  # newer torch: broadcast_buffers is deprecated
        return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on every rank's rows
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


class _AllReduceWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone().contiguous()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone().contiguous()
        dist.all_reduce(grad)
        return grad


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` concatenated in rank order (rows), differentiable; ``x`` itself on one process."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` concatenated in rank order, without gradient (keys for queues, memory-bank writes)."""
    if not is_distributed():
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the ranks, differentiable (global batch statistics, Barlow Twins' correlation)."""
    return _AllReduceWithGrad.apply(x) if is_distributed() else x


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over the ranks (logged metrics), without gradient."""
    if not is_distributed():
        return x
    out = x.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def agree(value):
    """Rank 0's ``value`` (any picklable object) on every rank, e.g. a run folder chosen on rank 0."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``x`` from rank ``src`` on every rank (shuffle-BN's permutation)."""
    if is_distributed():
        dist.broadcast(x, src)
    return x
