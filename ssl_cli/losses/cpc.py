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
        for d in self.directions:
            z = torch.rot90(latents, ROTATIONS[d], dims=(2, 3))
            t = torch.rot90(targets, ROTATIONS[d], dims=(2, 3))
            context = self.context[d](z)
            loss = sum(
                info_nce_step(pred(context) * self.emb_scale, t, k)
                for pred, k in zip(self.predictors[d], self.steps, strict=True)
            )
            total = total + loss
            parts[f"loss_{d}"] = loss.detach()
        return total, parts
