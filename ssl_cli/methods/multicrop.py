"""Multi-crop: views of several sizes through one encoder, same-size views batched together.

SwAV and DINO train on 2 global crops plus several small local crops. Running every view on its own wastes
the device; running all of them as one batch is impossible (sizes differ). As the references do, consecutive
views of one size are concatenated and encoded together, then split back into one tensor per view. The head
(projector, prototypes, DINO head) then runs once over the features of every crop, so its BatchNorm statistics
cover all crops, as in the official ``forward_head`` / ``MultiCropWrapper``.

[0] SwAV, Caron et al. 2020, arXiv:2006.09882, Sec. 3.2 (multi-crop); facebookresearch/swav resnet50.py
    (``forward``: backbone per resolution, ``forward_head`` on the concatenation).
[1] DINO, Caron et al. 2021, arXiv:2104.14294; facebookresearch/dino utils.MultiCropWrapper (the same).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import groupby

import torch

from ssl_cli.errors import RecipeError


def encode_by_size(encoder: Callable[[torch.Tensor], torch.Tensor], views: list[torch.Tensor]) -> list[torch.Tensor]:
    """``encoder`` applied to every view, one forward per run of consecutive same-size views, in view order."""
    out: list[torch.Tensor] = []
    for _, group in groupby(views, key=lambda v: tuple(v.shape[-2:])):
        batch = list(group)
        out.extend(encoder(torch.cat(batch)).split([v.shape[0] for v in batch]))
    return out


def encode_then_head(
    backbone: Callable[[torch.Tensor], torch.Tensor],
    head: Callable[[torch.Tensor], torch.Tensor],
    views: list[torch.Tensor],
) -> list[torch.Tensor]:
    """``head(backbone(view))`` for every view: the backbone per run of same-size views, the head once over the
    concatenated features of all views (one set of BatchNorm statistics over every crop), split back per view."""
    features = torch.cat(encode_by_size(backbone, views))
    return list(head(features).split([v.shape[0] for v in views]))


def check_num_targets(num_targets: int, num_views: int, what: str) -> None:
    """``method.num_targets`` (the global crops that get targets) must be among the recipe's views."""
    if num_targets > num_views:
        raise RecipeError(
            f"method.num_targets: {num_targets} {what}, but the recipe's [[views]] give only {num_views}; "
            f"valid: 1 to {num_views}"
        )
