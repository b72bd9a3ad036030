"""CPC v2's context network, predictors and InfoNCE loss over a grid of patch features.

Following the pseudocode of [0, Appendix A.2]:

- targets: a 1x1 convolution of the patch features to ``target_dim`` (64);
- context: a PixelCNN-style stack of 5 residual blocks (1x1 conv, ReLU, 1x3 conv, the grid shifted down one row and
  a 2x1 "valid" conv, ReLU, 1x1 conv back to the feature width), then a ReLU. The shift is the mask: the context at
  row ``r`` sees rows ``<= r`` only, never a row below it;
- one 1x1 convolution predictor per step ``k = i + 1`` for ``i`` in ``range(steps_to_ignore, steps_to_predict)``,
  its output scaled by ``emb_scale`` (0.1): the context at ``(r, c)`` predicts the target at ``(r + k, c)``;
- InfoNCE: each prediction is scored against every target of the batch (every position of every image, on every
  process), its own target the positive.

Predicting in more than one direction [0, Sec. 4.1, "prediction lengths and directions"]: the grid is rotated so that
the direction becomes top-to-bottom (``down``: as is; ``up``: 180 degrees; ``right``: the left column on top;
``left``: the right column on top), each direction with its own context network and predictors, the target
convolution shared. The loss is the sum over directions and steps (the pseudocode sums over steps).

[0] CPC v2, Henaff et al. 2019, "Data-Efficient Image Recognition with Contrastive Predictive Coding",
    arXiv:1905.09272.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_cli.distributed import gather_with_grad, rank
from ssl_cli.precision import fp32

# rotations (torch.rot90's k over dims (H, W)) that turn each direction into top-to-bottom
ROTATIONS = {"down": 0, "up": 2, "right": -1, "left": 1}


class MaskedResidualBlock(nn.Module):
    """One PixelCNN-style block: its output at row ``r`` depends on input rows ``r - 1`` and ``r`` only."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.row = nn.Conv2d(hidden, hidden, (1, 3), padding=(0, 1))
        self.column = nn.Conv2d(hidden, hidden, (2, 1))  # "valid", after one row of zeros on top
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.row(F.relu(self.reduce(x)))
        c = F.relu(self.column(F.pad(c, (0, 0, 1, 0))))
        return x + self.expand(c)


class ContextNetwork(nn.Module):
    """The masked context network: ``blocks`` residual blocks, then a ReLU [0, A.2 ``pixelCNN``]."""

    def __init__(self, channels: int, hidden: int = 256, blocks: int = 5) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[MaskedResidualBlock(channels, hidden) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.blocks(x))


def contexts_at_once(networks: list[ContextNetwork], grids: list[torch.Tensor]) -> list[torch.Tensor]:
    """``networks[i](grids[i])`` for every i, in one pass: the grids (each B x C x H x W) stacked along channels and
    every layer run as one grouped convolution whose weights are the networks' own, concatenated. The same
    arithmetic as one call per network (the parameters and their gradients stay each network's), in a quarter of
    the calls for four directions: the context network's small convolutions (a 7x7 grid) ran at about half the
    speed of the patch encoder's per multiply-add, one direction after the other."""
    groups = len(networks)
    x = torch.cat(grids, dim=1)
    for blocks in zip(*(net.blocks for net in networks), strict=True):
        c = _grouped(x, [b.reduce for b in blocks])
        c = _grouped(F.relu(c), [b.row for b in blocks])
        c = F.relu(_grouped(F.pad(c, (0, 0, 1, 0)), [b.column for b in blocks]))
        x = x + _grouped(c, [b.expand for b in blocks])
    return list(F.relu(x).chunk(groups, dim=1))


def _grouped(x: torch.Tensor, convs: list[nn.Conv2d]) -> torch.Tensor:
    """``convs[g]`` applied to the g-th channel group of ``x`` (same shapes and padding in every conv)."""
    weight = torch.cat([c.weight for c in convs])
    bias = torch.cat([c.bias for c in convs])
    return F.conv2d(x, weight, bias, padding=convs[0].padding, groups=len(convs))


@fp32  # logits of a few thousand candidates in bf16 would blur the softmax (ssl_cli.precision)
def info_nce_step(prediction: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """InfoNCE of one step ``k`` (rows ahead): ``prediction`` B x D x H x W (already scaled), ``targets``
    B x D x H x W. Predictions from rows ``0 .. H - k - 1``; candidates: every target of the global batch (gathered
    with their gradient under torchrun), the positive the target ``k`` rows below in the same column, same image."""
    b, d, h, w = targets.shape
    preds = prediction[:, :, : h - k].permute(0, 2, 3, 1).reshape(-1, d)  # (b, r, c) row-major
    candidates = gather_with_grad(targets.permute(0, 2, 3, 1).reshape(-1, d))  # all ranks' (b, r, c)
    logits = preds @ candidates.T
    image = torch.arange(b, device=preds.device).repeat_interleave((h - k) * w)
    cell = torch.arange((h - k) * w, device=preds.device).repeat(b)  # r * w + c within the image
    labels = rank() * b * h * w + image * h * w + k * w + cell
    return F.cross_entropy(logits, labels)


class CPCLoss(nn.Module):
    """Targets, one context network and set of predictors per direction, and the summed InfoNCE [0, A.2]."""

    def __init__(
        self,
        channels: int,
        target_dim: int = 64,
        emb_scale: float = 0.1,
        steps_to_ignore: int = 2,
        steps_to_predict: int = 3,
        directions: tuple[str, ...] = ("down", "up", "right", "left"),
        hidden: int = 256,
        blocks: int = 5,
    ) -> None:
        super().__init__()
        self.emb_scale = emb_scale
        self.steps = [i + 1 for i in range(steps_to_ignore, steps_to_predict)]
        self.directions = tuple(directions)
        self.targets = nn.Conv2d(channels, target_dim, 1)
        self.context = nn.ModuleDict({d: ContextNetwork(channels, hidden, blocks) for d in self.directions})
        self.predictors = nn.ModuleDict(
            {d: nn.ModuleList([nn.Conv2d(channels, target_dim, 1) for _ in self.steps]) for d in self.directions}
        )

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``latents``: B x C x H x W patch features. Returns the loss and each direction's part (detached)."""
        targets = self.targets(latents)
        total, parts = latents.new_zeros((), dtype=torch.float32), {}
        grids = [torch.rot90(latents, ROTATIONS[d], dims=(2, 3)) for d in self.directions]
        if latents.shape[2] == latents.shape[3]:  # rotated grids keep their shape: every direction in one pass
            contexts = contexts_at_once([self.context[d] for d in self.directions], grids)
        else:
            contexts = [self.context[d](z) for d, z in zip(self.directions, grids, strict=True)]
        for d, context in zip(self.directions, contexts, strict=True):
            t = torch.rot90(targets, ROTATIONS[d], dims=(2, 3))
            loss = sum(
                info_nce_step(pred(context) * self.emb_scale, t, k)
                for pred, k in zip(self.predictors[d], self.steps, strict=True)
            )
            total = total + loss
            parts[f"loss_{d}"] = loss.detach()
        return total, parts
