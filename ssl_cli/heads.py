"""Heads: projectors and predictors built from a small spec; they know nothing of the backbone."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from ssl_cli.config.schema import MethodConfig, PositiveInt
from ssl_cli.precision import full_precision

ProjectorKind = Literal["none", "linear", "mlp"]
LastNorm = Literal["none", "affine", "scale", "plain"]
"""BatchNorm on an MLP's output: none; ``affine`` (scale and shift); ``scale`` (a learned scale, no shift: SimCLR's
and SimCLR v2's last layer, TF's ``center=False``); ``plain`` (no parameters: SimSiam, MoCo v3, Barlow Twins)."""


class ScaleBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d with a learned per-feature scale and no shift (``bias`` is None).

    The official SimCLR (v1 and v2) projection head ends in a bias-free dense layer followed by a batch norm with
    ``center=False, scale=True`` [0]: the output keeps a learnable gain but its per-feature mean stays 0.

    [0] SimCLR v2, Chen et al. 2020, arXiv:2006.10029; official code google-research/simclr (tf2/model.py,
        ``LinearLayer(use_bias=False, use_bn=True)`` for the last projection layer).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True)
        self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if getattr(self, "weight", None) is not None:
            nn.init.ones_(self.weight)


class ProjectorConfig(MethodConfig):
    """Method settings shared by every method with a projector (SimCLR's none / linear / MLP ablation)."""

    projector: ProjectorKind = "mlp"
    proj_hidden_dim: PositiveInt = 2048
    proj_output_dim: PositiveInt = 128
    proj_batchnorm: bool = True
    """A normalisation layer after each hidden linear layer of the MLP (BatchNorm unless ``proj_norm`` says)."""
    proj_norm: Literal["batchnorm", "groupnorm"] = "batchnorm"
    """The hidden layers' normalisation when ``proj_batchnorm`` is on: ``batchnorm``, or ``groupnorm`` (32 groups),
    which uses no batch statistics, for BYOL with GroupNorm + WS (Richemond et al. 2020, arXiv:2010.10241)."""
    proj_layers: Annotated[int, Field(ge=2)] = 2
    """Linear layers in the MLP projector (SimCLR v2, SimSiam, Barlow Twins: 3)."""
    proj_last_batchnorm: LastNorm = "none"
    """BatchNorm on the MLP's output (see ``LastNorm``): ``scale`` (SimCLR, SimCLR v2), ``affine``, or ``plain`` (no
    parameters, SimSiam); the last linear layer then has no bias."""
    proj_last_bias: bool = True
    """A bias in the MLP's last linear layer when no BatchNorm follows it (BYOL's official projector and predictor
    have none: ``byol.toml`` sets false; the default is what runs saved before this key existed were trained with)."""


def _groups(width: int, max_groups: int = 32, min_size: int = 16) -> int:
    """GroupNorm groups for a feature vector: the most groups (<= 32, dividing both 32 and ``width``) that keep
    at least ``min_size`` channels each; a group of one channel would normalise every value to 0."""
    groups = math.gcd(max_groups, width)
    while groups > 1 and width // groups < min_size:
        groups //= 2
    return groups


def mlp(
    dims: Sequence[int],
    batchnorm: bool = True,
    last_batchnorm: bool = False,
    last_bias: bool = True,
    last_affine: bool | Literal["scale"] = True,
    norm: Literal["batchnorm", "groupnorm"] = "batchnorm",
) -> nn.Sequential:
    """Linear layers between ``dims[0] -> ... -> dims[-1]``; hidden layers get [BatchNorm] + ReLU.

    ``mlp([2048, 2048, 128])`` is the SimCLR / MoCo v2 projector; ``last_batchnorm`` adds a BatchNorm
    (without ReLU) after the final linear layer, as SimCLR v2's projector does (``last_affine=False``: no
    learned scale / shift, as SimSiam's; ``"scale"``: a scale and no shift, as SimCLR's). ``norm="groupnorm"``:
    the hidden layers get GroupNorm (32 groups; fewer for narrow layers, see ``_groups``) instead of BatchNorm,
    so every sample is normalised on its own.
    """
    if len(dims) < 2:
        raise ValueError(f"an MLP needs at least input and output sizes, got {list(dims)}")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        last = i == len(dims) - 2
        layers.append(nn.Linear(d_in, d_out, bias=last_bias if last else not batchnorm))
        if not last:
            if batchnorm and norm == "groupnorm":
                layers.append(nn.GroupNorm(_groups(d_out), d_out))
            elif batchnorm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU(inplace=True))
        elif last_batchnorm and last_affine == "scale":
            layers.append(ScaleBatchNorm1d(d_out))
        elif last_batchnorm:
            layers.append(nn.BatchNorm1d(d_out, affine=bool(last_affine)))
    return nn.Sequential(*layers)


def projector(cfg: ProjectorConfig, in_dim: int) -> tuple[nn.Module, int]:
    """SimCLR's projector ablation [0, Fig. 8]: none (identity), linear, or an MLP of ``proj_layers`` layers.

    Returns the module and its output size. Every method with a projector builds it here, so the ablation
    (``method.projector = "none" | "linear" | "mlp"``) works for all of them.

    [0] SimCLR, Chen et al. 2020, arXiv:2002.05709.
    """
    if cfg.projector == "none":
        return nn.Identity(), in_dim
    if cfg.projector == "linear":
        return nn.Linear(in_dim, cfg.proj_output_dim), cfg.proj_output_dim
    dims = [in_dim] + [cfg.proj_hidden_dim] * (cfg.proj_layers - 1) + [cfg.proj_output_dim]
    last_bn = cfg.proj_last_batchnorm != "none"
    layers = mlp(
        dims,
        batchnorm=cfg.proj_batchnorm,
        last_batchnorm=last_bn,
        last_bias=not last_bn and cfg.proj_last_bias,
        last_affine=last_affine(cfg.proj_last_batchnorm),
        norm=cfg.proj_norm,
    )
    return layers, cfg.proj_output_dim


def last_affine(kind: LastNorm) -> bool | Literal["scale"]:
    """``mlp``'s ``last_affine`` for a ``LastNorm`` value."""
    return "scale" if kind == "scale" else kind == "affine"


class WeightNormLinear(nn.Module):
    """A bias-free linear layer with weight normalisation: row k of the weight is ``g_k * v_k / ||v_k||``.

    DINO's last layer [0]. With ``fixed_norm`` the gains ``g`` stay 1 (not trained), so every output is a cosine
    between the input and a direction scaled only by the input's norm (``norm_last_layer = true``). Written out
    rather than with torch's weight-norm parametrisation so the state is two plain parameters, ``weight_v`` and
    ``weight_g``, that deep copies (the teacher) and checkpoints handle like any other.

    [0] DINO, Caron et al. 2021, arXiv:2104.14294, Sec. 3.1 (projection head).
    """

    def __init__(self, in_dim: int, out_dim: int, fixed_norm: bool = True) -> None:
        super().__init__()
        init = nn.Linear(in_dim, out_dim, bias=False).weight.detach()  # torch's default (Kaiming-uniform) init
        self.weight_v = nn.Parameter(init.clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fixed_norm)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)


class DINOHead(nn.Module):
    """DINO's projection head: MLP ``in -> hidden -> ... -> bottleneck`` (GELU, optional BatchNorm, truncated
    normal init std 0.02), L2 normalisation, then a weight-normalised bias-free layer to ``out_dim`` [0].

    [0] DINO, Caron et al. 2021, arXiv:2104.14294, Sec. 3.1 and Appendix; official code facebookresearch/dino
        (vision_transformer.DINOHead).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        layers: int = 3,
        batchnorm: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        modules: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            modules.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                if batchnorm:
                    modules.append(nn.BatchNorm1d(d_out))
                modules.append(nn.GELU())
        self.mlp = nn.Sequential(*modules)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(x)
        # the K logits feed softmaxes at T 0.04-0.1: the normalisation and the last layer run in fp32 even under
        # bf16 autocast, where rounding (up to 2^-8 of a logit near 1) would become up to 0.1 after the division
        with full_precision(h):
            return self.last_layer(nn.functional.normalize(h.float(), dim=-1))
