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
    assert r.method.momentum == 0.99 and r.method.proj_output_dim == 256
    assert r.backbone.freeze_patch_embed == ("vit" in name)
    assert r.method.proj_layers == (3 if "vit" in name else 2)


def test_bad_values_are_one_clear_error() -> None:
    assert_one_line_error("temperature", load_recipe, "mocov3", [("method.temperature", 0.0)])
    assert_one_line_error("momentum", load_recipe, "mocov3", [("method.momentum", 1.5)])


def test_keys_come_from_the_momentum_encoder_not_the_online_one() -> None:
    m = tiny_method("mocov3", *SMALL)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # make the key encoder differ from the online one, as it does after a few steps
        for p in [*m.key_backbone.parameters(), *m.key_projector.parameters()]:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    x1, x2 = torch.randn(6, 3, 32, 32, generator=g), torch.randn(6, 3, 32, 32, generator=g)
    loss = m.training_step([x1, x2], 0).loss.item()
    q1, q2 = m.predictor(m.projector(m.backbone(x1))), m.predictor(m.projector(m.backbone(x2)))
    with torch.no_grad():
        k1, k2 = m.key_projector(m.key_backbone(x1)), m.key_projector(m.key_backbone(x2))
        o1, o2 = m.projector(m.backbone(x1)), m.projector(m.backbone(x2))  # the online encoder, detached
    expected = (mocov3_contrastive(q1, k2, 1.0) + mocov3_contrastive(q2, k1, 1.0)).item()
    online = (mocov3_contrastive(q1, o2, 1.0) + mocov3_contrastive(q2, o1, 1.0)).item()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert abs(online - expected) > 1e-3  # keys from the online encoder would give another loss


def test_vit_is_the_official_vit_built_through_timm() -> None:
    m = tiny_method("mocov3-vit", *SMALL, ("backbone.name", "vit_tiny_patch16_224"), ("backbone.img_size", 32))
    vit = m.backbone
    assert m.recipe.backbone.kwargs == {"num_heads": 12} and vit.blocks[0].attn.num_heads == 12
    # fixed 2-D sin-cos position embedding: 0 for [CLS]; patch (row r, column c) = [sin(c w), cos(c w), sin(r w),
    # cos(r w)] with w_i = 1 / 10000^(i / (dim / 4)), computed here independently, patch by patch
    dim, grid = vit.embed_dim, vit.patch_embed.grid_size
    assert not vit.pos_embed.requires_grad and torch.equal(vit.pos_embed[0, 0], torch.zeros(dim))
    w = [1.0 / 10000 ** (i / (dim // 4)) for i in range(dim // 4)]
    for r, c in [(0, 1), (1, 0), (1, 1), (grid[0] - 1, grid[1] - 2)]:
        row = [math.sin(c * x) for x in w] + [math.cos(c * x) for x in w]
        row += [math.sin(r * x) for x in w] + [math.cos(r * x) for x in w]
        torch.testing.assert_close(vit.pos_embed[0, 1 + r * grid[1] + c], torch.tensor(row), rtol=1e-5, atol=1e-6)
    # xavier-uniform: the patch projection by the fan-in/out of its 3 x 16 x 16 -> dim linear map, Q/K/V as three
    bound = math.sqrt(6.0 / (3 * 16 * 16 + dim))
    patch = vit.patch_embed.proj.weight
    assert patch.abs().max() <= bound and patch.abs().max() > 0.95 * bound and patch.std() > 0.5 * bound / math.sqrt(3)
    assert torch.equal(vit.patch_embed.proj.bias, torch.zeros(dim))
    qkv = vit.blocks[0].attn.qkv.weight
    qkv_bound = math.sqrt(6.0 / (dim + dim))
    assert qkv.abs().max() <= qkv_bound and qkv.abs().max() > 0.95 * qkv_bound
    fc1 = vit.blocks[0].mlp.fc1.weight
    assert fc1.abs().max() <= math.sqrt(6.0 / sum(fc1.shape)) and torch.equal(
        vit.blocks[0].mlp.fc1.bias, torch.zeros(4 * dim)
    )
    # the ViT predictor ends in BatchNorm without affine parameters; the ResNet one does not
    assert isinstance(m.predictor[-1], torch.nn.BatchNorm1d) and not m.predictor[-1].affine
    resnet = tiny_method("mocov3", *SMALL)
    assert isinstance(resnet.predictor[-1], torch.nn.Linear) and resnet.predictor[-1].bias is None
    # and the weights load into a stock timm ViT of the same shape (export keeps working)
    import timm

    stock = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, num_heads=12)
    stock.load_state_dict(vit.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(stock.eval()(x), vit.eval()(x))


def test_resnet_recipe_crops_from_0_2_and_vit_recipe_from_0_08() -> None:
    assert [v.scale for v in load_recipe("mocov3").views] == [[0.2, 1.0], [0.2, 1.0]]
    assert [v.scale for v in load_recipe("mocov3-vit").views] == [[0.08, 1.0], [0.08, 1.0]]
