"""What the metadata of an ``ssl`` file may hold: each key's type, checked when the file is read.

The metadata of a checkpoint or an export is JSON that anyone can write: a file handed over by a stranger, or one
edited by hand, may hold a number where a name is expected (``recipe.recipe.name = 12``), a string where a table is
(``backbone = "resnet"``), a list of the wrong length. Every reader (``read_checkpoint``, ``load_backbone``,
``ssl inspect``, ``ssl export``, ``ssl transfer``) passes the metadata through :func:`check_metadata` first, so such
a file is one ``CheckpointError`` naming the file and the key, never a crash further on. Only types and shapes are
checked here; what the values mean is checked where they are used (the backbone as a recipe's ``[backbone]``, the
recipe by the recipe schema on ``--resume``). Keys not listed are left alone: a newer ``ssl`` may write more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ssl_cli.errors import CheckpointError

Size = Annotated[int, Field(ge=1, le=2**20)]
"""A width, a count of features or classes, one side of an image: positive and not absurd (a crafted 10^12 would
be a memory error, not an error message)."""
Count = Annotated[int, Field(ge=0)]


ABSENT: Any = None
"""The default of a table or list: a key that is absent is fine, but ``null`` is not (pydantic does not validate
defaults, so the type, without ``| None``, refuses an explicit null that ``meta.get(key, {}).get(...)`` would trip
on)."""


class _Meta(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _RecipeInfo(_Meta):
    name: str | None = None
    description: str | None = None


class _RecipeMethod(_Meta):
    name: str | None = None
    projector: str | None = None


class _RecipeTrain(_Meta):
    epochs: Count | None = None


class _Recipe(_Meta):
    """The resolved recipe; the whole of it is validated by the recipe schema where it is used (``--resume``)."""

    recipe: _RecipeInfo = ABSENT
    method: _RecipeMethod = ABSENT
    backbone: dict[str, Any] = ABSENT
    data: dict[str, Any] = ABSENT
    views: list[dict[str, Any]] = ABSENT
    optim: dict[str, Any] = ABSENT
    schedule: dict[str, Any] = ABSENT
    train: _RecipeTrain = ABSENT
    monitor: dict[str, Any] = ABSENT


class _Backbone(_Meta):
    name: str
    kwargs: dict[str, Any] = {}
    small_stem: bool = False
    norm: str = "batchnorm"
    num_features: Size | None = None


class _Preprocessing(_Meta):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    mean: Annotated[list[float], Field(min_length=3, max_length=3)] = ABSENT
    std: Annotated[list[Annotated[float, Field(gt=0.0)]], Field(min_length=3, max_length=3)] = ABSENT
    input_size: Annotated[list[Size], Field(min_length=3, max_length=3)] = ABSENT


class _Data(_Meta):
    spec: str | None = None
    name: str | None = None
    num_images: Count | None = None
    classes: list[str] = []
    val: str | None = None
    augment: str | None = None


class _Monitor(_Meta):
    val: str | None = None


class _Training(_Meta):
    """How the weights were trained: a checkpoint's own keys, an export's ``source``."""

    ssl_version: str | None = None
    method: str | None = None
    recipe: _Recipe = ABSENT
    data: _Data = ABSENT
    epoch: Count | None = None
    step: Count | None = None
    epoch_step: Count | None = None
    world_size: Size | None = None
    metrics: dict[str, float] = ABSENT
    monitor: _Monitor = ABSENT


class _Layer(_Meta):
    """One layer of the projector an export keeps (``ssl_cli.artifacts.backbone.head_from_spec``)."""

    type: Literal["linear", "batchnorm", "groupnorm", "relu"]
    in_: Size | None = Field(None, alias="in")
    out: Size | None = None
    bias: bool | None = None
    dim: Size | None = None
    groups: Size | None = None
    affine: bool | None = None
    shift: bool | None = None
    eps: Annotated[float, Field(gt=0.0)] | None = None

    @model_validator(mode="after")
    def _complete(self) -> _Layer:
        needs = {"linear": ("in_", "out", "bias"), "batchnorm": ("dim", "affine", "eps"), "groupnorm": ("groups",
                 "dim", "eps")}.get(self.type, ())  # fmt: skip
        missing = [name.rstrip("_") for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.type} layer needs {', '.join(missing)}")
        return self


class _Projector(_Meta):
    layers: Annotated[list[_Layer], Field(min_length=1)]
    num_layers: Size
    num_features: Size


class _Readout(_Meta):
    """How an image becomes its feature when not the backbone's own output (``ssl_cli.artifacts.readout``)."""

    type: Literal["patch_grid"]
    patch: Size
    stride: Size
    grid: Size | None = None


class _Config(_Meta):
    """An export's own summary (``backbone.json``)."""

    ssl_version: str | None = None
    method: str | None = None
    epoch: Count | None = None
    num_features: Size | None = None


class Metadata(_Training):
    """Every key ``ssl`` writes into a checkpoint, an export or a fine-tuned model (``format`` says which)."""

    format: str | None = None
    backbone: _Backbone = ABSENT
    preprocessing: _Preprocessing = ABSENT
    optim_groups: list[dict[str, Any]] = ABSENT
    optim_scalars: dict[str, Any] = ABSENT
    projector: _Projector = ABSENT
    readout: _Readout = ABSENT
    config: _Config = ABSENT
    source: _Training = ABSENT
    num_classes: Size | None = None
    classes: list[str] = ABSENT


class Finetuned(_Meta):
    """A model written by ``ssl transfer``: the backbone with its classifier (``ssl_cli.transfer.finetune``)."""

    format: str | None = None
    ssl_version: str | None = None
    backbone: _Backbone = ABSENT
    preprocessing: _Preprocessing = ABSENT
    projector: _Projector = ABSENT
    classes: list[str] = ABSENT
    num_classes: Size | None = None
    classifier: str | None = None
    source: dict[str, Any] = ABSENT
    metrics: dict[str, Any] = ABSENT


REQUIRED = ("backbone",)
"""What every ``ssl`` file holds that its readers cannot do without: the architecture to rebuild (without
``preprocessing`` they take ImageNet's statistics, or ask for ``--size``)."""


def _shown(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer beyond Python's 4,300-digit conversion limit
        return "a huge integer"
    return text if len(text) <= limit else text[: limit - 4] + " ..."


_KINDS = {"model_type": "must be a table", "dict_type": "must be a table", "list_type": "must be a list"}


def check_metadata(
    meta: Any, path: str | Path, required: tuple[str, ...] = REQUIRED, schema: type[BaseModel] = Metadata
) -> dict[str, Any]:
    """``meta`` (JSON values decoded) when each key it holds has the type ``ssl`` writes (``schema``: a checkpoint's
    or an export's, or ``Finetuned``), and it has ``required``; else a ``CheckpointError``: ``FILE: metadata KEY: what
    is wrong (got VALUE)``."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the metadata is not a table (got {_shown(meta)})")
    for key in required:
        if key not in meta:
            raise CheckpointError(f"{path}: metadata lacks '{key}'; it was not written by ssl, or was edited")
    try:
        schema.model_validate(meta)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = ".".join("in" if p == "in_" else str(p) for p in err["loc"])
        if err["type"] == "missing":
            raise CheckpointError(f"{path}: metadata {loc} is missing") from None
        msg = _KINDS.get(err["type"]) or err["msg"].removeprefix("Value error, ")
        raise CheckpointError(f"{path}: metadata {loc}: {msg} (got {_shown(err['input'])})") from None
    groups = meta.get("optim_groups") or []
    if not all(isinstance(g.get("params"), list) and all(type(i) is int for i in g["params"]) for g in groups):
        raise CheckpointError(f"{path}: metadata optim_groups: every group needs 'params', a list of indices")
    scalars = meta.get("optim_scalars") or {}
    if not all(k.partition(".")[0].isdigit() and k.partition(".")[2] for k in scalars):
        raise CheckpointError(f"{path}: metadata optim_scalars: keys must be 'INDEX.NAME'")
    return meta
