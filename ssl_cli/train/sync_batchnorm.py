"""Batch normalisation over the global batch of all ranks, on any backend (gloo on CPU as well as NCCL).

``torch.nn.SyncBatchNorm`` only runs on accelerators; this module does the same on every device: in training
mode the per-channel sum, sum of squares and count are summed over the ranks with a differentiable
all-reduce, so the statistics (and their gradients) are those of the whole global batch. On one process, or in
eval mode, it is plain ``BatchNorm``. SimCLR, BYOL and Barlow Twins train with synchronised BatchNorm at
scale (recipe key ``train.sync_batchnorm``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ssl_cli.distributed import all_reduce_with_grad, is_distributed


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm1d / 2d / 3d whose training statistics cover every rank's samples."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm: expected at least 2-D input (N x C ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        c = x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        # two passes (mean, then squared deviations), as BatchNorm: E[x^2] - E[x]^2 cancels catastrophically
        # for a channel that is nearly constant, and its normalised output then amplifies the rounding
        local = torch.cat([xf.sum(dims), xf.new_full((1,), x.numel() / c)])
        total = all_reduce_with_grad(local)
        count = total[-1]
        mean = total[:c] / count
        var = all_reduce_with_grad((xf - mean.view(shape)).pow(2).sum(dims)) / count  # biased, as BN normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * (count / (count - 1).clamp_min(1.0))
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape)
            if self.bias is not None:  # None: a scale without shift (heads.ScaleBatchNorm1d)
                y = y + self.bias.view(shape)
        return y.to(x.dtype)


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm layer of ``module`` replaced by a :class:`GlobalBatchNorm` with the same parameters and
    statistics (parameter names are unchanged, so checkpoints load either way)."""
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        new.to(device=module.running_mean.device if module.running_mean is not None else None)
        if module.affine and module.bias is None:
            new.register_parameter("bias", None)
        if module.affine:
            with torch.no_grad():
                new.weight = module.weight
                new.bias = module.bias
        if module.track_running_stats:
            new.running_mean = module.running_mean
            new.running_var = module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_global_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
