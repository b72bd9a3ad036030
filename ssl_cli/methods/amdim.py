"""AMDIM: Augmented Multiscale Deep InfoMax, NCE between features of two views at several scales.

Two augmented views of each image go through the encoder one after the other (BatchNorm statistics per view, as in
the reference). From each view come global features r1 (the encoder's output, N x D) and two local maps, r7 (7x7)
and r5 (5x5), each embedded to D channels by a 1x1 residual head (``ssl_cli.encoders.RKHSHead``). The loss
(``ssl_cli.losses.amdim``) is NCE between views: r1 predicts every location of the other view's r5 (1->5) and r7
(1->7), and one random location of a view's r5 predicts the other view's r5 (5->5); scores are soft-clipped with
tanh and their mean square is penalised. The trained loss is the sum of the three costs and the penalty.

Backbones:

- AMDIM's own encoder (``backbone.name = "amdim_32"`` / ``"amdim_64"`` / ``"amdim_128"``, ``ssl_cli.encoders.amdim``):
  r1 is its 1x1 output (no head, ``rkhs_dim = "auto"``), r7 and r5 its last 7x7 and 5x5 layers, as in the reference.
- Any timm CNN, e.g. ``backbone.name = "resnet18"``: the maps are read from the layers of timm's ``feature_info``
  whose sizes at the view size are nearest 7x7 and 5x5 (``ssl_cli.encoders.taps``; ResNet at 32 px: ``layer1`` 8x8
  and ``layer2`` 4x4); r1 is the pooled output, through a residual head too when ``rkhs_dim`` differs from the
  backbone's width.

The 5->5 source locations are drawn for the global batch from a generator seeded by ``train.seed`` and the step,
so one process and several draw the same ones, and a resumed run draws what the uninterrupted one would.
What kNN, the probe and ``ssl export`` read is the backbone's output: r1, the features the paper evaluates.

[0] Learning Representations by Maximizing Mutual Information Across Views, Bachman, Hjelm, Buchwalter 2019,
    arXiv:1906.00910.
[1] Official code github.com/Philip-Bachman/amdim-public (model.py ``Model`` / ``Encoder``, costs.py, train.py,
    task_self_supervised.py, datasets.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from ssl_cli.config.schema import MethodConfig, PositiveInt
from ssl_cli.data.loader import mix_seed
from ssl_cli.distributed import rank, world_size
from ssl_cli.encoders.amdim import RKHSHead
from ssl_cli.encoders.taps import Tap, capture_maps, map_taps
from ssl_cli.errors import RecipeError
from ssl_cli.losses.amdim import TERMS, amdim_loss
from ssl_cli.methods.base import Method, StepOutput
from ssl_cli.methods.registry import register

LOCAL_SIZES = (7, 5)
"""The local maps' side lengths, r7 then r5 (the reference's ``dim2layer`` sizes besides 1)."""


class AMDIMConfig(MethodConfig):
    name: Literal["amdim"] = "amdim"
    tclip: Annotated[float, Field(gt=0.0)] = 20.0
    """Scores are soft-clipped to tclip x tanh(score / tclip) (train.py ``--tclip 20``)."""
    score_reg: Annotated[float, Field(ge=0.0)] = 0.05
    """Weight of the mean squared raw score, taken before the clipping, per direction (costs.py: 5e-2)."""
    rkhs_dim: PositiveInt | Literal["auto"] = "auto"
    """Width D of the embeddings the scores compare (the paper's n_rkhs). ``auto``: the backbone's feature width
    (AMDIM's encoder: its own ``n_rkhs``, so r1 is its output); another width puts a residual head on r1 too."""


@register
class AMDIM(Method):
    Config = AMDIMConfig
    description = "AMDIM (2019): NCE of global vs local features across 2 views (1->5, 1->7, 5->5), tanh clip, Adam"
    # The demo's 80 steps on CPU: AMDIM's 32x32 encoder at a quarter of its width (the full one costs ~10x a
    # ResNet-18 at 32 px), a higher rate than the paper's 2e-4 (which is tuned for 300 epochs)
    demo_overrides = {
        "backbone.name": "amdim_32",
        "backbone.kwargs.ndf": 32,
        "backbone.kwargs.n_rkhs": 256,
        "backbone.kwargs.n_depth": 3,
        "optim.lr": 1e-3,
    }

    def __init__(self, config: AMDIMConfig, backbone: nn.Module, recipe) -> None:
        super().__init__(config, backbone, recipe)
        sizes = sorted({v.size for v in recipe.views})
        if len(sizes) != 1:
            raise RecipeError(f"views: AMDIM needs both views at one size (its maps must match), got sizes {sizes}")
        if recipe.train.batch_size < 2:
            raise RecipeError("train.batch_size: AMDIM needs at least 2 images per step (the others are the negatives)")
        self.taps: list[Tap] = _taps(backbone, recipe.backbone.name, sizes[0])
        dim = self.feature_dim if config.rkhs_dim == "auto" else int(config.rkhs_dim)
        hidden_bn = bool(getattr(backbone, "use_bn", False))  # the reference's --use_bn covers its heads too
        self.rkhs_1 = nn.Identity() if dim == self.feature_dim else RKHSHead(self.feature_dim, dim, hidden_bn)
        self.rkhs_7 = RKHSHead(self.taps[0].channels, dim, hidden_bn)
        self.rkhs_5 = RKHSHead(self.taps[1].channels, dim, hidden_bn)
        self.rkhs_dim = dim
        self.seed = recipe.train.seed

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """r1 (N x D), r5 and r7 (N x D x H x W) of one view: one ordinary call of the backbone, its 7x7 and 5x5
        layers read on the way."""
        names = [tap.module for tap in self.taps]
        with capture_maps(self.backbone, names) as maps:
            pooled = self.backbone(x)
        r1 = self.rkhs_1(pooled[:, :, None, None]).flatten(1)
        return r1, self.rkhs_5(maps[names[1]][0]), self.rkhs_7(maps[names[0]][0])

    def source_locations(self, step: int, n: int, device: torch.device) -> torch.Tensor:
        """2 x n locations of the 5x5 map (one per image and view), this process's rows of a draw for the global batch
        from (train.seed, step): the same on one process and on several, and again after a resume."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, step))
        drawn = torch.randint(self.taps[1].locations, (2, n * world_size()), generator=generator)
        return drawn[:, rank() * n : (rank() + 1) * n].to(device)

    def training_step(self, views: list[torch.Tensor], step: int, index: torch.Tensor | None = None) -> StepOutput:
        x1, x2 = views
        (a1, a5, a7), (b1, b5, b7) = self.encode(x1), self.encode(x2)
        locations = self.source_locations(step, x1.shape[0], x1.device)
        c = self.config
        out = amdim_loss([a1, b1], [a5, b5], [a7, b7], locations, tclip=c.tclip, score_reg=c.score_reg)
        return StepOutput(out["loss"], {k: out[k].detach() for k in (*TERMS, "lgt_reg")})


def _taps(backbone: nn.Module, name: str, size: int) -> list[Tap]:
    """The backbone's layers nearest 7x7 and 5x5 at the view size, or one line saying why there are none."""
    try:
        return map_taps(backbone, size, LOCAL_SIZES)
    except ValueError as e:
        raise RecipeError(f"backbone.name: AMDIM reads local feature maps of '{name}', but {e}") from None
    except RuntimeError as e:  # the forward itself fails: inputs too small for the network
        first = (str(e).strip().splitlines() or [""])[0]
        raise RecipeError(f"views.0.size: {size} px is too small for '{name}' ({first})") from None
