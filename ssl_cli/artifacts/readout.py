"""How a file's backbone turns an image into its feature: the backbone's own output, or CPC v2's patch grid.

Most backbones read a whole image: their output (pooled, ``num_classes=0``) is the feature. A CPC v2 run trained its
encoder on the patches of a grid, and its feature is the paper's linear-evaluation readout [0, Sec. 4.2]: the image
cut into the training grid, each patch through the encoder, the pooled patch features averaged over the grid
(``ssl_cli.encoders.patch_grid.PatchGridFeatures``). ``readout_of(meta)`` says which a file's metadata asks for:

- ``meta["readout"]`` when the file records one (``ssl export`` writes ``{"type": "patch_grid", "patch": P,
  "stride": S, "grid": G}``);
- else the recipe the weights were trained with (a training checkpoint's ``recipe``, an older export's
  ``source.recipe``): a ``cpcv2`` run's view size and ``method.grid`` (or ``patch_size`` / ``patch_stride``) give
  the grid, by the rule training used;
- else None: the backbone's own output.

[0] CPC v2, Henaff et al. 2019, arXiv:1905.09272.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ssl_cli.artifacts.checkpoint import FORMAT
from ssl_cli.encoders.patch_grid import READOUT, PatchGridFeatures, grid_size, half_overlap
from ssl_cli.errors import CheckpointError

CPC_METHOD = "cpcv2"


def _recipe(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The recipe the weights were trained with: a checkpoint's own, an export's ``source.recipe``."""
    recipe = meta.get("recipe") if meta.get("format") == FORMAT else (meta.get("source") or {}).get("recipe")
    return recipe if isinstance(recipe, dict) else None


def _cpc_grid(recipe: dict[str, Any]) -> tuple[int, int, int]:
    """(patch, stride, view size) of a CPC v2 recipe's training grid."""
    method = recipe["method"]
    size = int(recipe["views"][0]["size"])
    if method.get("patch_size") is not None and method.get("patch_stride") is not None:
        return int(method["patch_size"]), int(method["patch_stride"]), size
    return (*half_overlap(size, int(method["grid"])), size)


def readout_of(meta: dict[str, Any], path: str | Path | None = None) -> dict[str, Any] | None:
    """The readout a file's metadata asks for (see the module doc): ``{"type": "patch_grid", "patch", "stride",
    "grid"}`` (``grid``: patches per side at the file's input size), or None for the backbone's own output. A recorded
    or derived grid that does not cover the input size is a ``CheckpointError``."""
    where = f"{path}: " if path is not None else ""
    size = int(((meta.get("preprocessing") or {}).get("input_size") or [0, 0, 0])[-1])
    if isinstance(meta.get("readout"), dict):
        recorded = meta["readout"]
        if recorded.get("type") != READOUT:
            raise CheckpointError(f"{where}metadata readout.type: unknown readout {recorded.get('type')!r}")
        patch, stride, key = int(recorded["patch"]), int(recorded["stride"]), "readout"
    else:
        recipe = _recipe(meta)
        if recipe is None or (recipe.get("method") or {}).get("name") != CPC_METHOD:
            return None
        try:
            patch, stride, trained = _cpc_grid(recipe)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{where}metadata recipe: cannot tell the CPC v2 patch grid from views[0].size and method.grid / "
                f"patch_size / patch_stride ({type(e).__name__}: {e})"
            ) from None
        size, key = size or trained, "recipe.method"
    grid = grid_size(size, patch, stride)
    if grid < 1:
        raise CheckpointError(
            f"{where}metadata {key}: {patch} px patches {stride} apart do not cover the {size} px input exactly"
        )
    return {"type": READOUT, "patch": patch, "stride": stride, "grid": grid}


def with_readout(model: nn.Module, readout: dict[str, Any] | None) -> nn.Module:
    """``model`` read as ``readout`` says: wrapped in ``PatchGridFeatures`` for a patch grid; as it is for None."""
    if readout is None:
        return model
    return PatchGridFeatures(model, readout["patch"], readout["stride"]).train(model.training)


def describe_readout(readout: dict[str, Any] | None) -> str:
    """One line on how an image becomes its feature (``ssl inspect``, ``ssl export``)."""
    if readout is None:
        return "the backbone's output on the whole image"
    g, p, s = readout.get("grid"), readout["patch"], readout["stride"]
    grid = f"{g}x{g} grid" if g else "grid"
    return (
        f"the mean of the encoder's pooled features over a {grid} of {p} px patches {s} apart, each patch through "
        "the encoder alone (CPC v2's linear evaluation)"
    )
