"""A backbone back from a file: a training checkpoint, a safetensors export or an ``ssl export --format hf`` folder.

``load_backbone(path)`` rebuilds the timm model (eval mode) from the file's metadata and weights, with nothing of
the trainer or the exporter; an export that kept projector layers comes back as a ``ProjectedBackbone``, a CPC v2
file as a ``PatchGridFeatures`` (the mean over its patch grid: ``ssl_cli.artifacts.readout``). ``rebuild`` gives the
timm model alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from ssl_cli.artifacts.checkpoint import EXPORT_FORMAT, FORMAT
from ssl_cli.artifacts.metadata import check_metadata
from ssl_cli.artifacts.readout import readout_of, with_readout
from ssl_cli.artifacts.safetensors_io import read_safetensors
from ssl_cli.artifacts.state import load_state
from ssl_cli.backbones import build_backbone
from ssl_cli.config.schema import IMAGENET_MEAN, IMAGENET_STD, BackboneConfig
from ssl_cli.errors import CheckpointError, RecipeError, SSLError
from ssl_cli.heads import ScaleBatchNorm1d


def backbone_config(meta: dict[str, Any], path: str | Path | None = None) -> BackboneConfig:
    """The ``[backbone]`` section a checkpoint or export was made with, validated like a recipe's (so its timm
    keyword arguments are architecture only: a crafted file cannot make timm load a path it names)."""
    where = f"{path}: " if path is not None else ""
    from_recipe = isinstance(meta.get("recipe"), dict) and "backbone" in meta["recipe"]
    key = "recipe.backbone" if from_recipe else "backbone"
    try:
        return _backbone_config(meta, from_recipe)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in (key, *err["loc"]))
        raise CheckpointError(f"{where}metadata {loc}: {err['msg'].removeprefix('Value error, ')}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}metadata '{key}' is malformed ({type(e).__name__}: {e})") from None


def _backbone_config(meta: dict[str, Any], from_recipe: bool) -> BackboneConfig:
    if from_recipe:
        return BackboneConfig.model_validate(meta["recipe"]["backbone"])
    b = meta["backbone"]
    kwargs = dict(b.get("kwargs", {}))
    return BackboneConfig(
        name=b["name"],
        small_stem=bool(b.get("small_stem", False)),
        norm=b.get("norm", "batchnorm"),
        img_size=kwargs.pop("img_size", None),
        patch_size=kwargs.pop("patch_size", None),
        drop_path_rate=float(kwargs.pop("drop_path_rate", 0.0)),
        kwargs=kwargs,
    )


def build_from_meta(meta: dict[str, Any], path: str | Path, **update: Any) -> nn.Module:
    """The backbone (random weights) a file's metadata describes; what timm refuses to build is the file's fault:
    ``FILE: metadata backbone.small_stem: ...``."""
    config = backbone_config(meta, path)
    try:
        return build_backbone(config.model_copy(update=update))
    except RecipeError as e:  # the recipe's words for the same keys
        raise CheckpointError(f"{path}: metadata {e}") from None


def backbone_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    if meta.get("format") == FORMAT:
        prefix = "model.backbone."
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if meta.get("format") == EXPORT_FORMAT:
        return tensors
    raise CheckpointError(
        f"{path} is neither an ssl checkpoint nor an ssl export (format: {meta.get('format', 'missing')})"
    )


PROJECTOR_PREFIX = "projector."
HF_WEIGHTS = "model.safetensors"
"""The weights file of a Hugging Face-style folder (timm's ``local-dir:`` / hub layout)."""


class ProjectedBackbone(nn.Module):
    """A backbone followed by the first layers of a projection head; its output is the head's."""

    def __init__(self, backbone: nn.Module, head: nn.Sequential, num_features: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def head_from_spec(spec: list[dict[str, Any]]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for s in spec:
        if s["type"] == "linear":
            layers.append(nn.Linear(s["in"], s["out"], bias=s["bias"]))
        elif s["type"] == "batchnorm" and s["affine"] and s.get("shift") is False:
            layers.append(ScaleBatchNorm1d(s["dim"], eps=s["eps"]))
        elif s["type"] == "batchnorm":
            layers.append(nn.BatchNorm1d(s["dim"], eps=s["eps"], affine=s["affine"]))
        elif s["type"] == "groupnorm":
            layers.append(nn.GroupNorm(s["groups"], s["dim"], eps=s["eps"]))
        elif s["type"] == "relu":
            layers.append(nn.ReLU())
        else:
            raise CheckpointError(f"unknown projector layer type {s['type']!r} in the export's metadata")
    return nn.Sequential(*layers)


def select_output_view(model: nn.Module, output_view: str | None, meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """Make a CMC encoder (one network per colour view, ``ssl_cli.encoders.cmc``) return ``output_view``'s features
    ("all": every view's, concatenated; or one view's name); returns ``meta`` with the choice recorded in its
    ``backbone`` (kwargs ``output_view``, ``num_features``), so that the metadata rebuilds this model. None: the
    model and ``meta`` as they are. Another backbone, or a view it does not have, is a one-line error."""
    if output_view is None:
        return meta
    choose = getattr(model, "set_output_view", None)
    if choose is None:
        what = str(meta["backbone"].get("name", "a backbone"))
        what += " with projector layers" if isinstance(model, ProjectedBackbone) else ""
        raise SSLError(
            f"--output-view {output_view}: {path} holds {what}, which has no colour views to choose from "
            "(only CMC's encoders, cmc_*, have them)"
        )
    names = ", ".join(model.view_names)
    if output_view != "all" and output_view not in model.view_names:
        raise SSLError(f"--output-view {output_view}: {path} has the views {names}; valid are all, {names}")
    choose(output_view)
    backbone = {**meta["backbone"], "kwargs": {**meta["backbone"].get("kwargs", {}), "output_view": output_view}}
    if "num_features" in backbone:
        backbone["num_features"] = int(model.num_features)
    return {**meta, "backbone": backbone}


def load_backbone(
    path: str | Path,
    device: str = "cpu",
    with_meta: bool = False,
    random_init: bool = False,
    output_view: str | None = None,
):
    """Rebuild the timm backbone saved in a training checkpoint or an exported file (eval mode).

    ``random_init``: the same architecture with fresh random weights (torch seed 0), the baseline every
    self-supervised method must beat (``--random-init`` of ``ssl knn`` / ``probe`` / ``plot`` / ``neighbors``).

    ``output_view`` (CMC's encoders): ``"all"`` for every colour view's features concatenated, or one view's name
    (e.g. ``"L"``) for that network's alone; None keeps the file's own choice (``select_output_view``).

    An export made with ``projector_layers > 0`` comes back as a ``ProjectedBackbone`` (backbone + head).
    ``path`` may also be a folder written by ``ssl export --format hf`` (its ``model.safetensors`` is read).

    A CPC v2 file (its recipe, or an export's ``readout``) comes back as a ``PatchGridFeatures``: the image cut into
    the training grid, the backbone's pooled patch features averaged (``ssl_cli.artifacts.readout``); its
    ``encoder`` is the timm model, and the returned metadata's ``readout`` describes the grid.
    """
    path = Path(path).expanduser()
    if path.is_dir() and (path / HF_WEIGHTS).is_file():  # an ``ssl export --format hf`` folder
        path = path / HF_WEIGHTS
    tensors, meta = read_safetensors(path)
    model = rebuild(tensors, meta, path)
    if random_init:
        torch.manual_seed(0)
        model = build_from_meta(meta, path)
    meta = select_output_view(model, output_view, meta, path)
    if readout := readout_of(meta, path):  # CPC v2: the mean over the patch grid, random weights or trained
        model, meta = with_readout(model, readout), {**meta, "readout": readout}
    model = model.to(device).eval()
    return (model, meta) if with_meta else model


def preprocessing_stats(meta: dict[str, Any]) -> tuple[list[float], list[float]]:
    """The mean and std a file's backbone expects its inputs normalised with (ImageNet's when not recorded)."""
    pre = meta.get("preprocessing") or {}
    return list(pre.get("mean", IMAGENET_MEAN)), list(pre.get("std", IMAGENET_STD))


def rebuild(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> nn.Module:
    state = backbone_state(tensors, meta, path)
    check_metadata(meta, path)
    projected = meta.get("format") == EXPORT_FORMAT and bool(meta.get("projector"))
    head_state = {k[len(PROJECTOR_PREFIX) :]: v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX)}
    if projected:
        state = {k: v for k, v in state.items() if not k.startswith(PROJECTOR_PREFIX)}
    torch.manual_seed(0)
    model = build_from_meta(meta, path, freeze_patch_embed=False)
    load_state(model, state, f"{path}: the weights do not fit {backbone_config(meta, path).name}")
    if projected:
        head = head_from_spec(meta["projector"]["layers"])
        load_state(head, head_state, f"{path}: the projector weights do not fit its layers in the metadata")
        model = ProjectedBackbone(model, head, int(meta["projector"]["num_features"]))
    return model.eval()
