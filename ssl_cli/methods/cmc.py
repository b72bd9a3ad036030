"""CMC: Contrastive Multiview Coding, each colour view of an image contrasted with its other views.

One crop per image (random resized crop and flip, no colour jitter in the official code). The encoder
(``ssl_cli.encoders.cmc``, e.g. ``cmc_resnet50``) converts the RGB crop to Lab and gives the L channel and the ab
channels each to its own network; each view's pooled vector -> its own linear 128-d embedding -> L2 norm. Each view's
embedding must pick its own image's embedding of the other view out of negatives [0, Sec. 3].

With as many crops as colour views (``[[views]]`` count 2 for L, ab), each view's channels come from its own crop, each
crop with its own augmentation: the L of one crop against the ab of another, so the views share no pixel positions
(the two-crop CMC of the same author's PyContrast, ``CMCv2`` [2], contrasts L of crop 1 with ab of crop 2 and ab of
crop 1 with L of crop 2 through a momentum encoder; here each network sees one crop, one forward pass each). Losses:

- ``loss = "nce"`` (the paper's ImageNet runs): one memory bank per view (n x 128, the official ``memory_l`` /
  ``memory_ab``); the L embedding is scored against the ab bank at its own index and at ``nce_k`` = 16384 noise
  indices, the ab embedding against the L bank at the same indices; NCE with P = exp(v . z / tau) / Z, one Z per
  direction estimated from the first batch and then fixed, tau 0.07 [1, NCEAverage.py, NCECriterion.py];
- ``loss = "softmax"``: the same bank scores, cross-entropy with the own index first (the official ``--softmax``);
- ``loss = "infonce"``: no bank; each view's embedding against the other view's embeddings of the global batch.

The trained loss is the sum of the directed terms (``l_loss + ab_loss`` in the official code); with more than two
views (``backbone.kwargs.split = "L,a,b"``) ``pairs`` picks the core-view or the full-graph objective
(``ssl_cli.losses.cmc``). After each optimizer step every bank's rows of the batch move towards that view's new
embeddings: v_i <- normalise(0.5 v_i + 0.5 z_i) (the official code writes them during the forward pass, after the
scores are read: the same values). The noise indices are drawn for the global batch from a generator seeded by
``train.seed`` and the step: one process and several draw the same, and a resumed run draws what the uninterrupted one
would.

What kNN, the probe and ``ssl export`` read is the encoder's output: the views' pooled vectors concatenated (or one
view's: ``backbone.kwargs.output_view``).

[0] Contrastive Multiview Coding (CMC), Tian, Krishnan, Isola 2019, arXiv:1906.05849.
[1] Official code github.com/HobbitLong/CMC (train_CMC.py, models/resnet.py, NCE/).
[2] PyContrast, github.com/HobbitLong/PyContrast (learning/contrast_trainer.py, memory/mem_moco.py: CMC with two crops).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ssl_cli.config.schema import PositiveInt, Probability
from ssl_cli.data.loader import mix_seed
from ssl_cli.distributed import gather, rank, world_size
from ssl_cli.errors import RecipeError
from ssl_cli.heads import ProjectorConfig, ProjectorKind, projector
from ssl_cli.losses.cmc import Pairs, cross_view_infonce, cross_view_pairs
from ssl_cli.losses.instdisc import MemoryBank, estimate_z, nce_loss
from ssl_cli.losses.moco import positive_first_cross_entropy
from ssl_cli.methods.base import Method, StepOutput
from ssl_cli.methods.registry import register


class CMCConfig(ProjectorConfig):
    name: Literal["cmc"] = "cmc"
    projector: ProjectorKind = "linear"  # each view: pooled vector -> fc 128 -> L2 norm (the official fc + l2norm)
    loss: Literal["nce", "softmax", "infonce"] = "nce"
    """``nce``: memory banks, NCE with a fixed Z; ``softmax``: memory banks, cross-entropy over the own entry and the
    noise entries; ``infonce``: in-batch negatives, no bank."""
    pairs: Pairs = "core"
    """More than two views: ``core`` contrasts the first view with each other one, ``full`` every two views."""
    temperature: Annotated[float, Field(gt=0.0)] = 0.07
    nce_k: PositiveInt = 16384
    """Noise entries per image drawn uniformly from the other view's bank (``nce`` and ``softmax``)."""
    bank_momentum: Probability = 0.5
    """Momentum of the bank update (0: replace each entry by the new embedding)."""


@register
class CMC(Method):
    Config = CMCConfig
    description = "CMC (2019): L vs ab of Lab, a half-width ResNet per view, two memory banks, NCE 16384, tau 0.07"
    num_views = 1  # one crop, the encoder splits its colour channels into the views; or one crop per colour view
    multi_crop = True
    # 2,560 images: fewer noise entries than images, half-width ResNet-18s per view with GroupNorm + WS. With BatchNorm
    # the random Lab-split encoder already reaches kNN 0.49 on the demo (k = 20; eval-mode BN with its initial
    # statistics) and 8 epochs of CMC end at 0.21; with GroupNorm + WS: 0.48 against 0.27 for the random encoder
    demo_overrides = {"backbone.name": "cmc_resnet18", "backbone.norm": "groupnorm_ws", "method.nce_k": 1024}

    def __init__(self, config: CMCConfig, backbone: nn.Module, recipe) -> None:
        super().__init__(config, backbone, recipe)
        name = recipe.backbone.name
        if not hasattr(backbone, "forward_views"):
            raise RecipeError(
                f"backbone.name: CMC needs one network per colour view, '{name}' is one network; use cmc_resnet18, "
                "cmc_resnet50 or cmc_resnet101"
            )
        if list(recipe.data.mean) != [0.0] * 3 or list(recipe.data.std) != [1.0] * 3:
            raise RecipeError(
                f"data.mean: {name} takes RGB in [0, 1] and normalises in its own colour space; set data.mean = "
                "[0.0, 0.0, 0.0] and data.std = [1.0, 1.0, 1.0]"
            )
        if recipe.num_views not in (1, len(backbone.view_names)) or len({v.size for v in recipe.views}) > 1:
            raise RecipeError(
                f"views: CMC takes one crop (every colour view from it) or one crop per colour view "
                f"({len(backbone.view_names)} here) of one size, the recipe's [[views]] give {recipe.num_views} of "
                f"sizes {sorted({v.size for v in recipe.views})}"
            )
        heads = [projector(config, width) for width in backbone.view_widths]
        if len({dim for _, dim in heads}) != 1:
            raise RecipeError("method.projector: the views' embeddings differ in width; use projector = 'linear'")
        self.projectors = nn.ModuleList(head for head, _ in heads)
        self.embed_dim = heads[0][1]
        self.view_names = list(backbone.view_names)
        self.pairs = cross_view_pairs(len(self.view_names), config.pairs)
        # one Z per direction (anchor view, bank view), estimated from the first batch (0: not yet); a buffer, so a
        # resumed run keeps the same constants
        self.register_buffer("nce_z", torch.zeros(len(self.view_names), len(self.view_names), dtype=torch.float64))
        self.banks: nn.ModuleList | None = None
        self.seed = recipe.train.seed
        self._pending: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self._z_known = False  # avoids a host sync per step once Z is set (or loaded from a checkpoint)

    def bind_data(self, num_samples: int, labels: torch.Tensor | None) -> None:
        if self.config.loss != "infonce":
            device = self.nce_z.device
            self.banks = nn.ModuleList(MemoryBank(num_samples, self.embed_dim, device) for _ in self.view_names)

    def embed(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each view's L2-normalised embedding (N x D), from its own network and head; ``x``: the crop (N x 3 x H x W),
        or one crop per view stacked (V x N x 3 x H x W)."""
        pooled = self.backbone(x, all_views=True).split(self.backbone.view_widths, dim=1)
        return [F.normalize(head(h).float(), dim=1) for head, h in zip(self.projectors, pooled, strict=True)]

    def _capture_features(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # the training call returns every view's vector: the online classifier reads the output views', as kNN does
        if output.shape[-1] == sum(self.backbone.view_widths):
            output = self.backbone.select(output)
        super()._capture_features(module, inputs, output)

    def noise(self, step: int, n: int, device: torch.device) -> torch.Tensor:
        """n x nce_k bank indices, this process's rows of a draw for the global batch from (train.seed, step)."""
        generator = torch.Generator(device=device).manual_seed(mix_seed(self.seed, step))
        shape = (n * world_size(), self.config.nce_k)
        drawn = torch.randint(self.banks[0].size, shape, generator=generator, device=device)
        return drawn[rank() * n : (rank() + 1) * n]

    def bank_terms(self, z: list[torch.Tensor], index: torch.Tensor, step: int) -> dict[tuple[int, int], torch.Tensor]:
        """The loss of each direction (a, b): view a's embeddings scored against view b's bank."""
        idx = torch.cat([index[:, None], self.noise(step, index.shape[0], index.device)], dim=1)  # N x (1 + K)
        logits = {(a, b): self.banks[b].logits(idx, z[a], self.config.temperature) for a, b in self.pairs}
        if self.config.loss == "softmax":
            return {pair: positive_first_cross_entropy(s) for pair, s in logits.items()}
        if not self._z_known:
            for (a, b), s in logits.items():
                if self.nce_z[a, b].item() == 0.0:  # the mean over every rank's first batch under torchrun
                    self.nce_z[a, b] = estimate_z(s, self.banks[b].size)
            self._z_known = True
        n = self.banks[0].size
        return {(a, b): nce_loss(s - self.nce_z[a, b].log().float(), n) for (a, b), s in logits.items()}

    def training_step(self, views: list[torch.Tensor], step: int, index: torch.Tensor | None = None) -> StepOutput:
        if self.config.loss != "infonce" and (self.banks is None or index is None):
            raise RecipeError("cmc: the memory banks need bind_data() and the batch's dataset indices")
        z = self.embed(views[0] if len(views) == 1 else torch.stack(views))
        if self.config.loss == "infonce":
            terms = {(a, b): cross_view_infonce(z[a], z[b], self.config.temperature) for a, b in self.pairs}
        else:
            terms = self.bank_terms(z, index, step)
            # the banks are read by the loss graph: write the global batch's embeddings only after the optimizer step
            self._pending = (gather(index), [gather(v.detach()) for v in z])
        names = self.view_names
        metrics = {f"loss_{names[a]}_{names[b]}": t.detach() for (a, b), t in terms.items()}
        return StepOutput(torch.stack(list(terms.values())).sum(), metrics)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        if self._pending is not None:
            index, embeddings = self._pending
            for bank, z in zip(self.banks, embeddings, strict=True):
                bank.update(index, z, self.config.bank_momentum)
            self._pending = None
