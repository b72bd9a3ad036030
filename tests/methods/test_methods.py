"""SimCLR and MoCo v2: stop-gradients, momentum updates, queue semantics, shuffle-BN, the registry."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import random_views, tiny_method
from ssl_cli.errors import RecipeError
from ssl_cli.losses import NTXentLoss, moco_contrastive
from ssl_cli.methods import METHODS, get_method
from ssl_cli.methods.momentum import ema_update, frozen_copy, shuffled_forward
from ssl_cli.train.optim import build_optimizer


def tiny(name: str, *extra) -> nn.Module:
    return tiny_method(name, *extra)


def views(n: int = 8) -> list[torch.Tensor]:
    return random_views(n)


def test_registry_lists_methods_and_rejects_unknown() -> None:
    assert {"simclr", "mocov2"} <= set(METHODS)
    with pytest.raises(RecipeError, match=r"unknown method 'nope'; valid: .*mocov2.*simclr"):
        get_method("nope")


def test_method_rejects_wrong_number_of_views() -> None:
    with pytest.raises(RecipeError, match="needs 2 views"):
        tiny("simclr", ("views.0.count", 3))


@pytest.mark.parametrize(("kind", "expected"), [("none", nn.Identity), ("linear", nn.Linear), ("mlp", nn.Sequential)])
def test_simclr_projector_ablation(kind: str, expected: type) -> None:
    m = tiny("simclr", ("method.projector", kind), ("method.proj_hidden_dim", 32), ("method.proj_output_dim", 16))
    assert isinstance(m.projector, expected)
    x = views()
    out = m.training_step(x, 0)
    z1 = m.projector(m.backbone(torch.cat(x)))
    assert z1.shape[1] == (m.feature_dim if kind == "none" else 16)
    m.eval()  # BatchNorm in eval mode: per-sample outputs, so the loss can be recomputed from parts
    z1, z2 = m.projector(m.backbone(x[0])), m.projector(m.backbone(x[1]))
    assert m.training_step(x, 0).loss.item() == pytest.approx(NTXentLoss(m.config.temperature)(z1, z2).item(), rel=1e-5)
    assert out.loss.requires_grad


def test_mocov2_no_gradient_reaches_key_encoder_and_query_encoder_learns() -> None:
    m = tiny("mocov2", ("method.queue_size", 64))
    out = m.training_step(views(), 0)
    out.loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in m.key_backbone.parameters())
    assert all(not p.requires_grad and p.grad is None for p in m.key_projector.parameters())
    assert all(p.grad is not None for p in m.backbone.parameters() if p.requires_grad)
    names = {n for g in m.param_groups() for n in g["names"]}
    assert not any(n.startswith(("key_", "queue")) for n in names)  # the optimizer never sees them


def test_mocov2_key_encoder_starts_equal_and_follows_momentum_rule() -> None:
    m = tiny("mocov2", ("method.queue_size", 64), ("method.momentum", 0.9))
    for pk, pq in zip(m.key_backbone.parameters(), m.backbone.parameters(), strict=True):
        assert torch.equal(pk, pq)
    opt = build_optimizer(m.param_groups(), m.recipe.optim, 8)
    for step in range(2):
        key_before = [p.clone() for p in m.key_backbone.parameters()]
        m.training_step(views(), step).loss.backward()
        opt.step()
        opt.zero_grad()
        query_after = [p.detach().clone() for p in m.backbone.parameters()]
        m.after_optimizer_step(step, 10)
        for pk, k0, q1 in zip(m.key_backbone.parameters(), key_before, query_after, strict=True):
            torch.testing.assert_close(pk, 0.9 * k0 + 0.1 * q1)
    assert any(not torch.equal(a, b) for a, b in zip(m.key_backbone.parameters(), m.backbone.parameters(), strict=True))


def test_mocov2_enqueues_this_steps_keys_after_the_optimizer_step() -> None:
    m = tiny("mocov2", ("method.queue_size", 20), ("method.shuffle_bn_splits", 1))
    queue_before = m.queue.keys.clone()
    x = views(8)
    m.eval()  # deterministic keys so they can be recomputed
    expected_keys = m.key(x[1])
    out = m.training_step(x, 0)
    # the loss used the queue as it was before this step
    q = torch.nn.functional.normalize(m.projector(m.backbone(x[0])), dim=1)
    assert out.loss.item() == pytest.approx(
        moco_contrastive(q, expected_keys, queue_before, m.config.temperature).item(), rel=1e-5
    )
    # the monitor: how often the positive key outranks every queued negative
    sims = torch.cat([(q * expected_keys).sum(1, keepdim=True), q @ queue_before.T], dim=1)
    expected_acc = (sims.argmax(dim=1) == 0).float().mean()
    assert out.metrics["contrastive_acc"].item() == pytest.approx(expected_acc.item())
    assert torch.equal(m.queue.keys, queue_before)  # nothing written before the optimizer step
    m.after_optimizer_step(0, 10)
    torch.testing.assert_close(m.queue.keys[:8], expected_keys)
    assert torch.equal(m.queue.keys[8:], queue_before[8:])
    assert m.queue.ptr.item() == 8


def test_mocov2_symmetric_enqueues_both_views() -> None:
    m = tiny("mocov2", ("method.queue_size", 32), ("method.symmetric", True))
    m.training_step(views(8), 0)
    m.after_optimizer_step(0, 10)
    assert m.queue.ptr.item() == 16


def test_ema_update_math() -> None:
    online = nn.Linear(3, 2)
    target = frozen_copy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    before = [p.clone() for p in target.parameters()]
    ema_update([(target, online)], 0.99)
    for t, b, o in zip(target.parameters(), before, online.parameters(), strict=True):
        torch.testing.assert_close(t, 0.99 * b + 0.01 * o.detach())
        assert not t.requires_grad


def test_shuffled_forward_gives_each_subbatch_its_own_bn_statistics() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4)
    x = torch.randn(16, 4) * 3 + 1
    assert torch.allclose(shuffled_forward(bn, x, 1), bn(x))
    torch.manual_seed(5)
    out = shuffled_forward(bn, x, 4)
    torch.manual_seed(5)
    perm = torch.randperm(16)
    for chunk in perm.chunk(4):  # every sample is normalised with the statistics of its own sub-batch
        torch.testing.assert_close(out[chunk], nn.functional.batch_norm(x[chunk], None, None, training=True))
    assert not torch.allclose(out, bn(x), atol=1e-3)  # and not with whole-batch statistics
    bn.eval()
    torch.testing.assert_close(shuffled_forward(bn, x, 4), bn(x))  # order restored


def test_method_state_dict_roundtrip_keeps_queue_and_key_encoder() -> None:
    m = tiny("mocov2", ("method.queue_size", 16))
    m.training_step(views(8), 0)
    m.after_optimizer_step(0, 10)
    clone = tiny("mocov2", ("method.queue_size", 16))
    clone.load_state_dict(copy.deepcopy(m.state_dict()))
    assert torch.equal(clone.queue.keys, m.queue.keys) and clone.queue.ptr.item() == m.queue.ptr.item()
    for a, b in zip(clone.key_backbone.parameters(), m.key_backbone.parameters(), strict=True):
        assert torch.equal(a, b)
