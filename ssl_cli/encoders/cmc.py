"""CMC's encoder as a timm model: ``timm.create_model("cmc_resnet50")`` (also ``cmc_resnet18``, ``cmc_resnet101``).

An RGB image becomes its feature in three steps [0, Sec. 3-4; 1, models/resnet.py ``ResNetV1``]:

1. the N x 3 x H x W batch, RGB in [0, 1] (``data.mean = [0, 0, 0]``, ``data.std = [1, 1, 1]``: the encoder does its
   own normalisation), is converted to a colour space (``space``: ``lab`` by default, ``ydbdr``, ``ycbcr``) and each
   channel normalised with that space's fixed mean / std (``ssl_cli.encoders.colour``);
2. the channels are split into views (``split``: ``L,ab`` by default; ``L,a,b`` gives three views), and each view
   goes through its own network, a timm model built with ``in_chans`` = the view's channel count: a ResNet at
   ``width`` times its stage widths (0.5 by default, the official ``resnet50v1``: "half-width" ResNets, the stem kept
   at 64 channels as there), BatchNorm in the last layer of each block starting at 1 as in the official init;
3. each network's map is average-pooled and the views' vectors are concatenated in ``split`` order: the feature kNN,
   the linear probe and ``ssl export`` read (``num_features`` = the sum of the widths). ``output_view`` = one view's
   name (e.g. ``"L"``) returns that network's vector alone (the paper evaluates both ways);
   ``set_output_view`` re-selects it on a built encoder (``ssl knn`` / ``probe`` / ``export --output-view``).

The 128-d embeddings of the loss belong to the method (``ssl_cli.methods.cmc``), so an export holds the encoder
alone. ``forward(x, all_views=True)`` returns every view's pooled vector, for training; ``x`` may also stack one crop
per view (V x N x 3 x H x W: view v's channels from crop v).

Variants: ``cmc_resnet18`` / ``cmc_resnet50`` / ``cmc_resnet101`` (timm's ResNets per view; the official
``resnet{18,50,101}v1``; ``width = 1`` is its v2, ``width = 2`` its v3) and ``cmc_test_resnet`` (timm's tiny
``test_resnet`` per view, for tests). ``space``, ``split``, ``output_view`` and ``width`` are keyword arguments
(``backbone.kwargs`` in a recipe); further ones go to every view's timm model.

[0] Contrastive Multiview Coding (CMC), Tian, Krishnan, Isola 2019, arXiv:1906.05849.
[1] Official code github.com/HobbitLong/CMC (models/resnet.py, dataset.py, train_CMC.py).
"""

from __future__ import annotations

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import ResNet
from torch import nn

from ssl_cli.encoders.colour import SPACES, parse_split
from ssl_cli.encoders.head import PooledHead

ENCODERS = ("cmc_resnet18", "cmc_resnet50", "cmc_resnet101", "cmc_test_resnet")
"""The timm names this module registers."""


def _stage_widths(branch: str, in_chans: int, kwargs: dict) -> tuple[int, ...] | None:
    """The stage widths (``channels``) of timm ResNet ``branch``, read from a copy built on the meta device (no
    memory, no init); None when ``branch`` is not a timm ResNet."""
    with torch.device("meta"):
        model = timm.create_model(branch, num_classes=0, in_chans=in_chans, **kwargs)
    if not isinstance(model, ResNet):
        return None
    stages = [getattr(model, f"layer{i}") for i in range(1, 5)]
    return tuple(_planes(s[0]) for s in stages)


def _planes(block: nn.Module) -> int:
    """A timm ResNet block's ``planes`` (its output width over its expansion)."""
    last = block.conv3 if hasattr(block, "conv3") else block.conv2
    return last.out_channels // type(block).expansion


def _branch(branch: str, in_chans: int, width: float, kwargs: dict) -> nn.Module:
    """One view's network: timm model ``branch`` with ``in_chans`` inputs and no classifier, a ResNet's stage widths
    scaled by ``width``."""
    widths = _stage_widths(branch, in_chans, kwargs)
    if widths is None:
        if width != 1.0:
            raise ValueError(f"width = {width} scales timm ResNets' stages; {branch!r} is not one (use width = 1)")
        return timm.create_model(branch, num_classes=0, in_chans=in_chans, **kwargs)
    scaled = tuple(max(1, int(w * width)) for w in widths)
    # the official ResNets start every BatchNorm at weight 1; timm zeroes each block's last one unless told
    kwargs = {"zero_init_last": False, **kwargs}
    return timm.create_model(branch, num_classes=0, in_chans=in_chans, channels=scaled, **kwargs)


class CMCEncoder(PooledHead):
    """One network per colour view, timm's model interface (``num_features``, ``forward_features``, ``forward_head``,
    ``reset_classifier``); see the module doc."""

    def __init__(
        self,
        branch: str = "resnet50",
        width: float = 0.5,
        space: str = "lab",
        split: str = "auto",
        output_view: str = "all",
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__()
        if in_chans != 3:
            raise ValueError(
                f"in_chans = {in_chans}: CMC's encoder takes RGB images (3 channels) and splits them itself"
            )
        if not width > 0:
            raise ValueError(f"width = {width} must be positive")
        views = parse_split(space, split)
        self.space = SPACES[space]
        self.view_names = [name for name, _ in views]
        self.output_index = self._output_index(output_view)
        self.view_channels = [channels for _, channels in views]
        self.branches = nn.ModuleList(_branch(branch, len(c), width, kwargs) for c in self.view_channels)
        self.view_widths = [int(b.num_features) for b in self.branches]
        self.init_head(sum(self.view_widths[i] for i in self.output_index), num_classes, global_pool, drop_rate)

    def _output_index(self, output_view: str) -> list[int]:
        if output_view == "all":
            return list(range(len(self.view_names)))
        if output_view not in self.view_names:
            raise ValueError(f"output_view {output_view!r}: valid are all, {', '.join(self.view_names)}")
        return [self.view_names.index(output_view)]

    @property
    def output_view(self) -> str:
        """What ``forward`` returns: ``"all"`` (every view's vector) or one view's name."""
        if len(self.output_index) == len(self.view_names):
            return "all"
        return self.view_names[self.output_index[0]]

    def set_output_view(self, output_view: str) -> None:
        """Re-select the views ``forward`` returns after construction (the weights stay): ``"all"`` or one view's
        name, as the ``output_view`` argument. ``num_features`` follows; a classifier head (``num_classes > 0``) is
        rebuilt at the new width with fresh weights, as ``reset_classifier`` does (``num_classes = 0``: identity)."""
        self.output_index = self._output_index(output_view)
        self.num_features = self.head_hidden_size = sum(self.view_widths[i] for i in self.output_index)
        self.reset_classifier(self.num_classes)
        if self.num_classes > 0:  # the new head where the rest of the model is
            ref = next(self.branches.parameters())
            self.head.to(ref.device, ref.dtype)

    def split_views(self, x: torch.Tensor) -> list[torch.Tensor]:
        """RGB in [0, 1] -> each view's normalised channels (N x C_v x H x W), in ``split`` order. ``x``: one batch
        (N x 3 x H x W), every view from it; or one batch per view stacked (V x N x 3 x H x W), view v from ``x[v]``."""
        if x.dim() == 4:
            converted = self.space.normalised(x)
            return [converted[:, channels] for channels in self.view_channels]
        if x.dim() != 5 or x.shape[0] != len(self.view_channels):
            raise ValueError(f"input {tuple(x.shape)}: N x 3 x H x W, or {len(self.view_channels)} x N x 3 x H x W")
        return [self.space.normalised(crop)[:, channels] for crop, channels in zip(x, self.view_channels, strict=True)]

    def forward_views(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every view's pooled vector (N x D_v), each from its own network: what CMC contrasts (input as
        ``split_views``'s)."""
        return [
            self.global_pool(b.forward_features(v)) for b, v in zip(self.branches, self.split_views(x), strict=True)
        ]

    def select(self, every_view: torch.Tensor) -> torch.Tensor:
        """The output views' columns of ``forward(x, all_views=True)``: what ``forward`` returns (without a head)."""
        if len(self.output_index) == len(self.view_widths):
            return every_view
        parts = every_view.split(self.view_widths, dim=1)
        return torch.cat([parts[i] for i in self.output_index], dim=1)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        # the views' networks side by side: the same depth in each is one layer (timm's layer decay)
        blocks = r"^branches\.\d+\.layer(\d+)" if coarse else r"^branches\.\d+\.layer(\d+)\.(\d+)"
        return {"stem": r"^branches\.\d+\.(?:conv1|bn1)", "blocks": blocks}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The output views' maps concatenated along channels (N x num_features x h x w); only their networks run."""
        views = self.split_views(x)
        return torch.cat([self.branches[i].forward_features(views[i]) for i in self.output_index], dim=1)

    def forward(self, x: torch.Tensor, all_views: bool = False) -> torch.Tensor:
        """The output views' pooled vectors (through the head, if any). ``all_views``: every view's pooled vector
        concatenated in ``split`` order (N x sum of ``view_widths``, no head), what training contrasts; a call of the
        module, so hooks (the online classifier, ``ssl bench``) and ``train.compile`` see it."""
        if all_views:
            return torch.cat(self.forward_views(x), dim=1)
        return self.forward_head(self.forward_features(x))


def _cfg(paper: bool = True) -> dict:
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": (0.0, 0.0, 0.0),  # RGB in [0, 1]: the encoder normalises in its own colour space
        "std": (1.0, 1.0, 1.0),
        "first_conv": "branches.0.conv1",
        "classifier": "head",
        "license": "bsd-2-clause",
        "paper_ids": "arXiv:1906.05849" if paper else "",
        "origin_url": "https://github.com/HobbitLong/CMC",
    }


default_cfgs = generate_default_cfgs({name: _cfg(name != "cmc_test_resnet") for name in ENCODERS})


def _create(variant: str, pretrained: bool, branch: str, kwargs: dict) -> CMCEncoder:
    if "branch" in kwargs:
        raise TypeError(
            f"{variant} has {branch} per view; for another network per view use one of {', '.join(ENCODERS)}"
        )
    return build_model_with_cfg(CMCEncoder, variant, pretrained, branch=branch, **kwargs)


def _register(variant: str, branch: str, doc: str) -> None:
    """The timm entry point ``variant`` (a function of that name in this module, as ``@register_model`` wants)."""

    def entry(pretrained: bool = False, **kwargs) -> CMCEncoder:
        return _create(variant, pretrained, branch, kwargs)

    entry.__name__ = entry.__qualname__ = variant
    entry.__doc__ = doc
    globals()[variant] = register_model(entry)


_register("cmc_resnet18", "resnet18", "CMC: a ResNet-18 per view at half width (the official resnet18v1).")
_register("cmc_resnet50", "resnet50", "CMC: a ResNet-50 per view at half width (the official resnet50v1).")
_register("cmc_resnet101", "resnet101", "CMC: a ResNet-101 per view at half width (the official resnet101v1).")
_register("cmc_test_resnet", "test_resnet", "CMC with timm's tiny test_resnet per view at half width: for tests.")
