"""YADIM: NCE with the sum over positives between the last feature maps of two views (Falcon & Cho 2020).

The paper builds YADIM from its five parts [0, Sec. 5]:

1. augmentation: the union of the CPC and AMDIM pipelines applied twice to each image (the recipes' ``[[views]]``:
   random resized crop, flip, colour jitter, random grey, normalisation; see ``recipes/yadim.toml`` for the one
   transform not reproduced);
2. encoder: AMDIM's wide encoder (``backbone.name = "amdim_32"`` / ``"amdim_128"``, ``ssl_cli.encoders.amdim``), or
   any timm CNN ("the choice of any other encoder would not have a significant impact");
3. representation extraction: only the encoder's LAST feature map, (r^a_{-1}, R^+_{-1}, R^-_{-1});
4. similarity: the dot product (``method.similarity = "cosine"`` swaps in SimCLR's);
5. loss: NCE with the sum over the positive set in the numerator (``ssl_cli.losses.yadim``).

The triplets, precisely: each location of view 1's last map of image i is an anchor; its positive set R+ is every
location of view 2's last map of the same image i, its negative set R- every location of view 2's last map of every
other image of the (global) batch; and symmetrically with the views swapped, the two directions averaged. The last
map is the output of the last layer that timm's ``feature_info`` names (``ssl_cli.encoders.taps``), read by a hook
while the backbone runs as usual: for AMDIM's encoder its final 1x1 map of ``n_rkhs`` channels (so R+ is one
vector: the other view's global features), for a stock ResNet its last stage (7x7 at 224 px, 49 positives per
anchor). No head: the scores compare the encoder's own features. Both views go through the encoder one after the
other (BatchNorm statistics per view).

What kNN, the probe and ``ssl export`` read is the backbone's pooled output (for AMDIM's encoder its 1x1 map, the
same vectors the loss compares).

[0] A Framework For Contrastive Self-Supervised Learning And Designing A New Approach, Falcon & Cho 2020,
    arXiv:2009.00104, Sec. 5 (YADIM).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from ssl_cli.config.schema import MethodConfig
from ssl_cli.encoders.taps import Tap, capture_maps, feature_modules, measure_maps
from ssl_cli.errors import RecipeError
from ssl_cli.losses.yadim import ScoreScale, Scoring, Similarity, yadim_loss
from ssl_cli.methods.amdim import AMDIM
from ssl_cli.methods.base import Method, StepOutput
from ssl_cli.methods.registry import register


class YADIMConfig(MethodConfig):
    name: Literal["yadim"] = "yadim"
    denominator: Literal["all", "negatives"] = "all"
    """``all``: the denominator sums the positives and the negatives (NCE as usual: a cross-entropy, >= 0);
    ``negatives``: the negatives only, as the paper's formula reads (unbounded below without ``tclip``)."""
    similarity: Similarity = "dot"
    """How two feature vectors are compared (the framework's part 4): ``dot``, the dot product [0, Sec. 5 (4)],
    scaled by ``score_scale``; ``cosine``, their cosine divided by ``temperature`` (SimCLR's)."""
    score_scale: ScoreScale = "sqrt_dim"
    """With ``similarity = "dot"``: ``sqrt_dim``, dot products divided by sqrt(D), as AMDIM's NCE (which the
    authors' YADIM code reuses); ``none``, the plain dot product."""
    temperature: Annotated[float, Field(gt=0.0)] = 0.1
    """With ``similarity = "cosine"``: the cosine is divided by it."""
    tclip: Annotated[float, Field(ge=0.0)] = 20.0
    """Scores soft-clipped to tclip x tanh(score / tclip), as AMDIM's NCE (``--tclip 20``); 0: no clip."""


@register
class YADIM(Method):
    Config = YADIMConfig
    description = "YADIM (2020): NCE, sum over positives, between the last feature maps of 2 views, AMDIM's encoder"
    # The demo's 80 steps on CPU: AMDIM's demo encoder (amdim_32 at a quarter of its width) and Adam at 1e-3
    demo_overrides = AMDIM.demo_overrides

    def __init__(self, config: YADIMConfig, backbone: nn.Module, recipe) -> None:
        super().__init__(config, backbone, recipe)
        sizes = sorted({v.size for v in recipe.views})
        if len(sizes) != 1 or sum(v.count for v in recipe.views) != 2:
            raise RecipeError(f"views: YADIM needs 2 views at one size, got sizes {sizes}")
        if recipe.train.batch_size < 2:
            raise RecipeError("train.batch_size: YADIM needs at least 2 images per step (the others are the negatives)")
        self.tap: Tap = _last_map(backbone, recipe.backbone.name, sizes[0])

    def last_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map of one view (N x D x H x W), read during one ordinary call of the backbone."""
        with capture_maps(self.backbone, [self.tap.module]) as maps:
            self.backbone(x)
        return maps[self.tap.module][0]

    def training_step(self, views: list[torch.Tensor], step: int, index: torch.Tensor | None = None) -> StepOutput:
        c = self.config
        maps = [self.last_map(x) for x in views]
        scoring = Scoring(c.similarity, c.score_scale, c.temperature, c.tclip)
        out = yadim_loss(maps, scoring, denominator=c.denominator)
        return StepOutput(out["loss"], {k: out[k].detach() for k in ("nce_12", "nce_21")})


def _last_map(backbone: nn.Module, name: str, size: int) -> Tap:
    """The backbone's last ``feature_info`` layer with an N x C x H x W map, or one line saying why there is none."""
    try:
        shapes = measure_maps(backbone, size)
    except RuntimeError as e:  # the forward itself fails: inputs too small for the network
        first = (str(e).strip().splitlines() or [""])[0]
        raise RecipeError(f"views.0.size: {size} px is too small for '{name}' ({first})") from None
    last = [m for m in feature_modules(backbone) if len(shapes.get(m, ())) == 3][-1:]
    if not last:
        raise RecipeError(f"backbone.name: YADIM reads the last feature map of '{name}', but its timm feature_info "
                          "names no layer with N x C x H x W feature maps (a CNN is needed)")  # fmt: skip
    channels, h, w = shapes[last[0]]
    return Tap(last[0], (h, w), channels)
