"""``ssl pretrain`` as one library call: everything the command does, which the CLI only calls.

``run_pretraining(recipe, data, out, ...)`` resolves the recipe (the demo settings without ``data``; with
``resume``, the run folder's own ``recipe.toml`` and the ``--data`` / ``--val`` recovered from its last checkpoint),
joins the torchrun process group when launched by torchrun, picks a new run folder on rank 0 so that every process
writes into the same one, trains (``ssl_cli.train.pretrain.pretrain``) and leaves the process group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssl_cli.artifacts.checkpoint import read_checkpoint
from ssl_cli.config import load_recipe, recipe_from_dict
from ssl_cli.config.schema import Recipe
from ssl_cli.distributed import agree, env_rank, init_from_env, launched_by_torchrun, shutdown
from ssl_cli.errors import RecipeError
from ssl_cli.methods import get_method
from ssl_cli.runtime import Reporter
from ssl_cli.train.pretrain import PretrainResult, pretrain
from ssl_cli.train.run_dir import RunDir, default_run_dir

Overrides = Iterable[str | tuple[str, Any]]


# The built-in demo data is 2,560 images of 32x32: whatever the recipe was written for, the demo runs a small,
# fast version of it (plain-stem ResNet-18 at 32x32, a few epochs). Flags and --set still win over these.
DEMO_OVERRIDES: dict[str, object] = {
    "backbone.name": "resnet18",
    "backbone.small_stem": False,
    "views.*.size": 32,
    "train.epochs": 8,
    "train.batch_size": 256,
    "train.checkpoint_every": 0,
    "schedule.warmup_epochs": 1,
}


# ViT recipes stay ViTs on the demo: a 4-block ViT-Tiny with 8x8 patches at 32x32 (16 tokens), as fast as the ResNet
DEMO_VIT_OVERRIDES: dict[str, object] = {
    "backbone.name": "vit_tiny_patch16_224",
    "backbone.img_size": 32,
    "backbone.patch_size": 8,
    "backbone.kwargs.depth": 4,
}


def demo_overrides(method_name: str, recipe: Recipe | None = None) -> list[tuple[str, object]]:
    """Recipe changes that make any recipe a ~2-minute CPU run on the demo data (a small ViT for ViT recipes)."""
    general = dict(DEMO_OVERRIDES)
    if recipe is not None and is_vit(recipe):
        del general["backbone.small_stem"]
        general.update(DEMO_VIT_OVERRIDES)
    return [*general.items(), *get_method(method_name).demo_overrides.items()]


def is_vit(recipe: Recipe) -> bool:
    b = recipe.backbone
    return b.name.startswith(("vit", "deit")) or bool(b.patch_size or b.freeze_patch_embed or b.dynamic_img_size)


@dataclass(frozen=True)
class PretrainPlan:
    """What a pretraining call resolved to before it trains."""

    recipe: Recipe
    data: str | None
    val: str | None
    note: str | None = None
    """A line for the user (the demo settings taken without ``data``), or None."""


def plan_pretraining(
    recipe: str | None,
    data: str | None,
    out: Path | None,
    resume: bool,
    overrides: Overrides,
    val: str | None,
    extend_to: int | None = None,
) -> PretrainPlan:
    """The resolved recipe and data of a run, or of the run in ``out`` to continue (``resume``; with ``extend_to``,
    to that many epochs)."""
    overrides = list(overrides)
    if extend_to is not None:
        if not resume:
            raise RecipeError(f"--extend-to {extend_to} continues a run: pass --resume --out RUN_FOLDER with it")
        overrides = _extension_overrides(overrides, extend_to)
    if resume:
        if out is None:
            raise RecipeError("--resume needs --out: the run folder to continue")
        run = RunDir(out)
        if not run.last.is_file():
            raise RecipeError(run.no_last_checkpoint())
        ckpt = read_checkpoint(run.last)
        # the run folder's recipe.toml is the resolved recipe of the first run (demo settings included); the
        # checkpoint holds it too, for a folder that lost its recipe.toml
        if recipe is None and not run.recipe_file.is_file():
            resolved = recipe_from_dict(ckpt.meta["recipe"], f"{run.last} (recipe)", overrides)
        else:
            resolved = load_recipe(recipe or str(run.recipe_file), overrides)
        if not isinstance(ckpt.meta.get("data"), dict) and data is None:
            raise RecipeError(f"--resume: {run.last} does not say what data it was trained on; pass --data with it")
        saved = ckpt.meta.get("data") or {}
        note = None
        if data is not None and saved.get("spec") not in (None, data):
            note = f"note: --resume with --data {data}; the run was trained on {saved['spec']} until now"
        return PretrainPlan(resolved, data or saved.get("spec"), val or saved.get("val"), note)
    if recipe is None:
        raise RecipeError("pass --recipe NAME or --recipe FILE.toml (see: ssl recipes list)")
    if data is not None:
        return PretrainPlan(load_recipe(recipe, overrides), data, val)
    base = load_recipe(recipe)
    demo = demo_overrides(base.method.name, base)
    note = "no --data: training on the built-in demo set (2,560 generated 32x32 images); demo settings: " + ", ".join(
        f"{k}={v}" for k, v in demo
    )
    return PretrainPlan(load_recipe(recipe, [*demo, *overrides]), None, val, note)


def _extension_overrides(overrides: list, extend_to: int) -> list:
    """``overrides`` with ``train.epochs = extend_to``; an ``--epochs`` / ``--set train.epochs`` that says otherwise is
    an error."""
    for item in overrides:
        key, value = item if isinstance(item, tuple) else (item.partition("=")[0].strip(), item.partition("=")[2])
        if key == "train.epochs" and str(value).strip() != str(extend_to):
            raise RecipeError(
                f"--extend-to {extend_to} sets train.epochs; drop the --epochs / --set train.epochs={value}"
            )
    return [*overrides, ("train.epochs", extend_to)]


def run_pretraining(
    recipe: str | None,
    data: str | None = None,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    overrides: Overrides = (),
    val: str | None = None,
    extend_to: int | None = None,
    reporter: Reporter | None = None,
    log: Callable[[str], None] | None = None,
) -> PretrainResult | None:
    """Do what ``ssl pretrain`` does: ``recipe`` is a built-in name or a TOML path (None with ``resume``: the run
    folder's), ``data`` a folder or dataset name (None: the demo set, or with ``resume`` the run's own),
    ``overrides`` ``--set``-style pairs, ``extend_to`` (with ``resume``) more epochs than the run planned. Returns the
    result on the main process (rank 0), None on the others."""
    out = None if out is None else Path(out)
    plan = plan_pretraining(recipe, data, out, resume, overrides, val, extend_to)
    if plan.note and log is not None and env_rank() == 0:
        log(plan.note)
    if launched_by_torchrun():  # one process group for the folder choice and the training
        init_from_env(plan.recipe.train.device)
    try:
        run_dir = out or agree(default_run_dir(plan.recipe.recipe.name or "run"))
        result = pretrain(
            plan.recipe, plan.data, run_dir, resume=resume, reporter=reporter, val=plan.val, extend_to=extend_to
        )
    finally:
        shutdown()
    return result if env_rank() == 0 else None
