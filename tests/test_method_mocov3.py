"""MoCo v3: loss against a direct computation, stop-gradients, momentum schedule and EMA step by step, and the
ViT recipe's frozen patch projection (stays bit-identical while everything else trains)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_one_line_error, tiny_method
from ssl_cli.config import load_recipe
from ssl_cli.losses.mocov3 import mocov3_contrastive
from ssl_cli.train.optim import build_optimizer

SMALL = [("method.proj_hidden_dim", 32), ("method.pred_hidden_dim", 32), ("method.proj_output_dim", 16)]


def test_loss_against_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    expected = 0.0
    for i in range(5):
        sims = [math.exp(float(qn[i] @ kn[j]) / 0.2) for j in range(5)]
        expected += -math.log(sims[i] / sum(sims)) / 5
    assert mocov3_contrastive(q, k, 0.2).item() == pytest.approx(2 * 0.2 * expected, rel=1e-5)


def test_gradient_reaches_queries_only() -> None:
    m = tiny_method("mocov3", *SMALL)
    views = [torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)]
    m.training_step(views, 0).loss.backward()
    assert all(p.grad is None for p in [*m.key_backbone.parameters(), *m.key_projector.parameters()])
    assert all(p.grad is not None for p in m.predictor.parameters())
    assert m.backbone.conv1[0].weight.grad.abs().sum() > 0


def test_momentum_rises_from_base_to_one_and_ema_step_by_step() -> None:
    m = tiny_method("mocov3", *SMALL)
    assert m.momentum(0, 100) == pytest.approx(0.99)
    assert m.momentum(50, 100) == pytest.approx(0.995)
    assert m.momentum(99, 100) == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(0.1)
    before = [p.clone() for p in m.key_backbone.parameters()]
    m.after_optimizer_step(50, 100)
    for old, key, online in zip(before, m.key_backbone.parameters(), m.backbone.parameters(), strict=True):
        torch.testing.assert_close(key, 0.995 * old + 0.005 * online)


def test_vit_recipe_keeps_the_patch_projection_frozen_while_the_rest_trains() -> None:
    m = tiny_method("mocov3-vit-cifar", *SMALL, ("backbone.name", "vit_tiny_patch16_224"))
    opt = build_optimizer(m.param_groups(), m.recipe.optim, 8)
    for group in opt.param_groups:
        group["lr"] = 1e-3
    patch = m.backbone.patch_embed.proj.weight.detach().clone()
    blocks = m.backbone.blocks[0].attn.qkv.weight.detach().clone()
    for step in range(2):
        out = m.training_step([torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)], step)
        opt.zero_grad()
        out.loss.backward()
        assert m.backbone.patch_embed.proj.weight.grad is None
        opt.step()
        m.after_optimizer_step(step, 10)
    assert torch.equal(m.backbone.patch_embed.proj.weight, patch)
    assert torch.equal(m.key_backbone.patch_embed.proj.weight, patch)  # its EMA copy too
    assert not torch.equal(m.backbone.blocks[0].attn.qkv.weight, blocks)


@pytest.mark.parametrize("name", ["mocov3", "mocov3-cifar", "mocov3-vit", "mocov3-vit-cifar"])
def test_recipes_load(name: str) -> None:
    r = load_recipe(name)
    assert r.method.momentum_base == 0.99 and r.method.proj_output_dim == 256
    assert r.backbone.freeze_patch_embed == ("vit" in name)
    assert r.method.proj_layers == (3 if "vit" in name else 2)


def test_bad_values_are_one_clear_error() -> None:
    assert_one_line_error("temperature", load_recipe, "mocov3", [("method.temperature", 0.0)])
    assert_one_line_error("momentum_base", load_recipe, "mocov3", [("method.momentum_base", 1.5)])
