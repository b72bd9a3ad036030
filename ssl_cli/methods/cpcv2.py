"""CPC v2: contrastive predictive coding over a grid of image patches.

Each image (one view) is cut into an overlapping grid of patches on the training device, each patch augmented on its
own (a flip, colour dropping: ``ssl_cli.augment.patches``; drawn for the global batch from the seed and the step, so
several processes augment as one does), and every patch goes through the backbone alone: a timm
CNN whose normalisation is per sample (the recipes pass ``backbone.kwargs.norm_layer = "groupnorm1"`` to timm's
ResNet: GroupNorm with one group, a layer norm over C x H x W), so no statistics are shared between the patches of one
image or of one batch [0, Sec. 4.1 "layer normalization"]. The pooled patch features form a grid that a masked
(PixelCNN-style) context network reads; linear predictors forecast the features k rows ahead, in four directions, and
InfoNCE scores each forecast against every patch of every image of the global batch (``ssl_cli.losses.cpc``).

How an image becomes its feature: as in the paper's linear evaluation [0, Sec. 4.2], the un-augmented image is cut
into the training grid (the recipe's view size and ``grid``, or ``patch_size`` / ``patch_stride``), each patch goes
through the backbone alone, and the backbone's pooled patch features are averaged over the grid
(``ssl_cli.encoders.patch_grid.PatchGridFeatures``). ``ssl knn`` / ``probe`` / ``embed`` / ``plot`` and
``ssl_cli.load_backbone`` read a CPC v2 checkpoint this way (``--random-init`` too), and so does the online kNN monitor
(``feature_model``). ``ssl export`` keeps the weights a stock timm model's (``timm.create_model(name, num_classes=0,
norm_layer="groupnorm1")`` loads them: the encoder of one patch) and records the grid in its metadata
(``readout``), so ``ssl_cli.load_backbone(export)`` gives the image feature again; the TorchScript and ONNX exports
hold the whole readout (grid cut inside), an hf folder the patch encoder. Running the backbone on the whole image
instead (the mean of a dense grid of patch-sized receptive fields, with context across patch borders) is another,
weaker feature (kNN top-1 0.18 vs 0.27 on the demo).

The online classifier (``ssl pretrain --val``) trains on the step's patch features (it classifies single patches) and
is scored on the held-out images' grid-mean features.

[0] CPC v2, Henaff et al. 2019, "Data-Efficient Image Recognition with Contrastive Predictive Coding",
    arXiv:1905.09272 (Sec. 4.1; Appendix A.2, pseudocode of the context network and the loss).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from ssl_cli.augment.patches import PatchDraws, apply_patch_augmentation, draw_patch_augmentation
from ssl_cli.config.schema import MethodConfig
from ssl_cli.data.loader import mix_seed
from ssl_cli.distributed import rank, world_size
from ssl_cli.encoders.patch_grid import PatchGridFeatures, extract_patches, grid_size, half_overlap
from ssl_cli.errors import RecipeError
from ssl_cli.losses.cpc import CPCLoss
from ssl_cli.methods.base import Method, StepOutput
from ssl_cli.methods.registry import register

Direction = Literal["down", "up", "right", "left"]


class CPCv2Config(MethodConfig):
    name: Literal["cpcv2"] = "cpcv2"
    grid: Annotated[int, Field(ge=2)] = 7
    """Patches per side, overlapping by half: a view of size S gives patches of ``2 S / (grid + 1)`` pixels,
    ``S / (grid + 1)`` apart (the paper's 7x7 grid of 64 px patches at stride 32 from 256 px; 8 / 4 at 32 px)."""
    patch_size: Annotated[int, Field(ge=1)] | None = None
    """Set both ``patch_size`` and ``patch_stride`` to cut another grid (``grid`` is then ignored)."""
    patch_stride: Annotated[int, Field(ge=1)] | None = None
    target_dim: Annotated[int, Field(ge=1)] = 64
    emb_scale: Annotated[float, Field(gt=0.0)] = 0.1
    context_dim: Annotated[int, Field(ge=1)] = 256
    """Width inside the context network's residual blocks."""
    context_blocks: Annotated[int, Field(ge=1)] = 5
    steps_to_ignore: Annotated[int, Field(ge=0)] = 2
    """Predictions ``k = i + 1`` rows ahead for ``i`` in ``range(steps_to_ignore, steps_to_predict)`` (A.2)."""
    steps_to_predict: Annotated[int, Field(ge=1)] = 3
    directions: list[Direction] = ["down", "up", "right", "left"]
    patch_hflip_prob: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    patch_color_drop_prob: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    """Per patch: keep one colour channel at random, set the other two to 0 (the mean, after normalisation)."""

    @field_validator("directions")
    @classmethod
    def _directions(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"give one or more distinct directions of down, up, right, left, got {v}")
        return v

    @model_validator(mode="after")
    def _patch(self) -> CPCv2Config:
        if (self.patch_size is None) != (self.patch_stride is None):
            raise ValueError("set both patch_size and patch_stride, or neither (then grid decides them)")
        return self

    @model_validator(mode="after")
    def _steps(self) -> CPCv2Config:
        if self.steps_to_predict <= self.steps_to_ignore:
            raise ValueError(
                f"steps_to_predict ({self.steps_to_predict}) must exceed steps_to_ignore ({self.steps_to_ignore}): "
                "no step left to predict"
            )
        return self


def patch_geometry(config: CPCv2Config, size: int) -> tuple[int, int]:
    """(patch size, stride) for views of ``size`` pixels; a grid that does not tile the view is a RecipeError."""
    if config.patch_size is not None and config.patch_stride is not None:
        patch, stride = config.patch_size, config.patch_stride
        if grid_size(size, patch, stride) < 2:
            raise RecipeError(
                f"method.patch_size: {patch}-pixel patches {stride} apart do not tile a {size}-pixel view in 2 or more "
                f"rows; choose size = patch_size + n x patch_stride (e.g. 32 = 8 + 6 x 4)"
            )
        return patch, stride
    if size % (config.grid + 1):
        raise RecipeError(
            f"method.grid: a {config.grid}x{config.grid} grid of half-overlapping patches needs a view size divisible "
            f"by {config.grid + 1}, got {size}; set views.*.size, method.grid, or method.patch_size and patch_stride"
        )
    return half_overlap(size, config.grid)


@register
class CPCv2(Method):
    Config = CPCv2Config
    description = "CPC v2 (2019): patch grid, masked context network, InfoNCE k rows ahead in 4 directions"
    num_views = 1
    # the demo (32x32) on the demo's plain-stem ResNet-18: a 3x3 grid of 16 px patches 8 apart, predicting 2 rows
    # ahead (the one row that does not overlap its context's), so that 2 epochs take about as long as the other
    # methods' demos (the 7x7 grid of 8 px patches costs about 17 images' worth of compute per image)
    demo_overrides = {
        "method.grid": 3,
        "method.steps_to_ignore": 1,
        "method.steps_to_predict": 2,
        "method.context_dim": 64,
        "train.batch_size": 64,
        "train.epochs": 2,
        "schedule.warmup_epochs": 0.2,
        "optim.lr": 2e-3,
        "optim.lr_scaling": "none",
    }

    def __init__(self, config: CPCv2Config, backbone, recipe) -> None:
        super().__init__(config, backbone, recipe)
        self.seed = recipe.train.seed
        self.patch, self.stride = patch_geometry(config, recipe.views[0].size)
        self.grid = grid_size(recipe.views[0].size, self.patch, self.stride)
        if self.grid <= config.steps_to_predict:
            raise RecipeError(
                f"method.steps_to_predict: {config.steps_to_predict} rows ahead needs a grid of more than "
                f"{config.steps_to_predict} rows; the views give {self.grid}"
            )
        self.loss = CPCLoss(
            self.feature_dim,
            config.target_dim,
            config.emb_scale,
            config.steps_to_ignore,
            config.steps_to_predict,
            tuple(config.directions),
            config.context_dim,
            config.context_blocks,
        )

    def patch_draws(self, step: int, images: int) -> PatchDraws:
        """The patch augmentation of this process's ``images`` images at ``step``, patch-major (G G B): its rows of a
        draw for every patch of the global batch from (train.seed, step), so one process and several augment each
        image alike, and a resumed run draws what the uninterrupted one would."""
        cfg = self.config
        generator = torch.Generator().manual_seed(mix_seed(self.seed, step))
        shape = (images * world_size(), self.grid * self.grid)  # image-major over the global batch
        draws = draw_patch_augmentation(shape, cfg.patch_hflip_prob, cfg.patch_color_drop_prob, generator)
        mine = slice(rank() * images, (rank() + 1) * images)
        return PatchDraws(*(t[mine].T.contiguous() for t in (draws.flip, draws.drop, draws.keep)))

    def patch_features(self, images: torch.Tensor, step: int = 0) -> torch.Tensor:
        """B x C x S x S images -> B x F x G x G: the backbone's pooled feature of each patch, patch by patch (in
        training mode each patch augmented as ``patch_draws(step, B)`` says)."""
        b, c = images.shape[:2]
        p, g = self.patch, self.grid
        # patch-major order (patch (i, j) of every image, then the next patch): the online classifier's label order
        patches = extract_patches(images, p, self.stride).permute(1, 2, 0, 3, 4, 5).reshape(-1, c, p, p)
        if self.training:
            patches = apply_patch_augmentation(patches, self.patch_draws(step, b))
        features = self.backbone(patches)  # (G G B) x F
        return features.reshape(g, g, b, -1).permute(2, 3, 0, 1)

    def feature_model(self) -> nn.Module:
        """The paper's readout: the mean over the (un-augmented) patch grid of the backbone's pooled patch features."""
        return PatchGridFeatures(self.backbone, self.patch, self.stride)

    def training_step(self, views: list[torch.Tensor], step: int, index: torch.Tensor | None = None) -> StepOutput:
        loss, parts = self.loss(self.patch_features(views[0], step))
        return StepOutput(loss, parts)
