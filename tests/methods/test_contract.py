"""What every registered method must do, checked over the registry: a new method file is tested here without being
listed anywhere (timm's contract-test idea). Each method needs a built-in recipe and a ``-cifar`` variant, a tiny
step with a finite loss whose gradients reach exactly the parameters that train, a ``state_dict`` that round-trips,
a place in the 2-process equivalence cases (``tests/dist_worker.py``) and in the learning tests."""

from __future__ import annotations

import copy

import pytest
import torch
from test_learning import METHODS as LEARNING

from conftest import TINY
from dist_worker import CASES
from ssl_cli.config import builtin_recipes, load_recipe
from ssl_cli.methods import METHODS
from ssl_cli.train.launch import DEMO_VIT_OVERRIDES, is_vit
from ssl_cli.train.pretrain import build_method

BATCH = 8


def _recipes_of(method: str) -> list[str]:
    return [r for r in builtin_recipes() if load_recipe(r).method.name == method]


def _tiny(method: str):
    """The method's own recipe on TINY settings (a ViT recipe on the demo's small ViT, cut to one block; CMC on its
    tiny per-view encoder) and a fresh instance bound to a data set of ``BATCH`` images."""
    recipe = load_recipe(method)
    vit = [*DEMO_VIT_OVERRIDES.items(), ("backbone.kwargs.depth", 1)] if is_vit(recipe) else []
    # CMC's encoder is one network per colour view: its tiny variant has timm's test ResNet per view
    per_view = [("backbone.name", "cmc_test_resnet")] if recipe.backbone.name.startswith("cmc_") else []
    recipe = load_recipe(method, [*TINY, *vit, *per_view, ("train.batch_size", BATCH)])
    torch.manual_seed(0)
    m = build_method(recipe).train()
    m.bind_data(BATCH, None)
    return recipe, m


def _stepped(method: str):
    """The method after one training step on random views (loss backward, no optimizer step)."""
    recipe, m = _tiny(method)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(BATCH, 3, v.size, v.size, generator=g) for v in recipe.views for _ in range(v.count)]
    index = torch.arange(BATCH)
    m.epoch_start(0, lambda: iter([(views, index)]))
    out = m.training_step(views, 0, index)
    out.loss.backward()
    return m, out


def test_the_registry_finds_every_method_file() -> None:
    assert len(METHODS) >= 15 and {"simclr", "dino", "amdim", "cmc"} <= set(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_builtin_recipe_and_a_cifar_variant(method: str) -> None:
    recipes = _recipes_of(method)
    assert method in recipes, f"no built-in recipe named {method!r}"
    assert any(r.endswith("-cifar") for r in recipes), f"no -cifar recipe for {method}: {recipes}"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_tiny_step_has_a_finite_loss_and_gradients_exactly_where_parameters_train(method: str) -> None:
    m, out = _stepped(method)
    assert torch.isfinite(out.loss)
    backbone = {id(p) for p in m.backbone.parameters()}
    for name, p in m.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"{name} is frozen but got a gradient"
        elif id(p) in backbone:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"backbone parameter {name}: no gradient"
    # momentum copies, queues and banks take no gradient: every tensor outside the parameters is a buffer
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.parameters())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_state_dict_round_trips(method: str) -> None:
    m, _ = _stepped(method)
    _, clone = _tiny(method)
    clone.load_state_dict(copy.deepcopy(m.state_dict()))
    for (name, a), b in zip(m.state_dict().items(), clone.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", sorted(METHODS))
def test_takes_part_in_the_two_process_equivalence_cases(method: str) -> None:
    assert method in {recipe_method(recipe) for recipe, _ in CASES.values()}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_is_in_the_learning_tests(method: str) -> None:
    assert method in {recipe_method(recipe) for recipe in LEARNING}


def recipe_method(recipe: str) -> str:
    return load_recipe(recipe.split("+")[0]).method.name  # the learning tests' "simclr+sample-augment" variants
