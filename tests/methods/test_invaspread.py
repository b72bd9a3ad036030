"""InvaSpread: the softmax embedding loss against an explicit loop, gradients, its minimum, recipes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import random_views, tiny_method
from ssl_cli.config import load_recipe
from ssl_cli.errors import RecipeError
from ssl_cli.losses import invaspread_loss


def loop_loss(z1: torch.Tensor, z2: torch.Tensor, tau: float, detach_keys: bool = False) -> torch.Tensor:
    """Eq. (5) of the paper, symmetric over both halves (BatchCriterion, negM = 1), one anchor at a time.

    For anchor a with copy t: P(b|a) = exp(f_b.f_a/tau) / sum_{k != a} exp(f_k.f_a/tau);
    loss_a = -log P(t|a) - sum_{b not in {a, t}} log(1 - P(b|a)); the loss is the mean over the 2N anchors.
    """
    f = F.normalize(torch.cat([z1, z2]), dim=1)
    n2 = f.shape[0]
    total = 0.0
    for a in range(n2):
        t = (a + n2 // 2) % n2
        others = [b for b in range(n2) if b != a]
        key = (lambda b: f[b].detach()) if detach_keys else (lambda b: f[b])  # noqa: E731
        e = {b: torch.exp(key(b) @ f[a] / tau) for b in others}
        denom = sum(e.values())
        total = total - torch.log(e[t] / denom)
        for b in others:
            if b != t:
                total = total - torch.log(1 - e[b] / denom)
    return total / n2


def embeddings(n: int = 5, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    return z1, z1 + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_loss_matches_the_explicit_loop(tau: float) -> None:
    z1, z2 = embeddings()
    for detach in (False, True):
        got = invaspread_loss(z1, z2, tau, detach).double()
        assert got.item() == pytest.approx(loop_loss(z1, z2, tau).item(), rel=1e-5)


def test_loss_matches_the_official_batch_criterion_layout() -> None:
    """The reference's x matrix: row a = [exp(s(a, twin)/tau), exp(s(a, b)/tau) for b not in {a, twin}]."""
    z1, z2 = embeddings(n=4)
    f = F.normalize(torch.cat([z1, z2]), dim=1)
    n2, tau = 8, 0.1
    rows = []
    for a in range(n2):
        t = (a + 4) % n2
        rows.append([f[t] @ f[a]] + [f[b] @ f[a] for b in range(n2) if b not in (a, t)])
    x = torch.exp(torch.tensor(rows) / tau)  # 2N x (2N - 1)
    div = x.sum(1)
    expected = -(torch.log(x[:, 0] / div).sum() + torch.log(1 - x[:, 1:] / div[:, None]).sum()) / n2
    assert invaspread_loss(z1, z2, tau).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("detach", [False, True])
def test_gradient_flows_to_both_halves_and_matches_the_loop(detach: bool) -> None:
    a1, a2 = embeddings(n=4)
    b1, b2 = a1.clone().requires_grad_(), a2.clone().requires_grad_()
    a1.requires_grad_()
    a2.requires_grad_()
    invaspread_loss(a1, a2, 0.1, detach).backward()
    loop_loss(b1, b2, 0.1, detach).backward()
    assert a1.grad.abs().sum() > 0 and a2.grad.abs().sum() > 0
    torch.testing.assert_close(a1.grad, b1.grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(a2.grad, b2.grad, rtol=1e-4, atol=1e-8)


def test_detaching_keys_changes_the_gradient_not_the_value() -> None:
    z1, z2 = embeddings(n=4)
    grads = []
    for detach in (False, True):
        x1, x2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        invaspread_loss(x1, x2, 0.1, detach).backward()
        grads.append(x1.grad)
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("tau", [0.1, 0.2])
def test_aligned_orthogonal_embeddings_reach_the_closed_form(tau: float) -> None:
    """Copies identical (s = 1), every other pair orthogonal (s = 0): with c = e^{1/tau} + 2N - 2, each anchor's loss
    is -log(e^{1/tau}/c) - (2N - 2) log(1 - 1/c); with a small tau this goes to 0."""
    n = 6
    z = torch.eye(n, 16, dtype=torch.float64) * 3.0  # any scale: the loss normalises
    c = math.exp(1 / tau) + 2 * n - 2
    closed = -math.log(math.exp(1 / tau) / c) - (2 * n - 2) * math.log(1 - 1 / c)
    assert invaspread_loss(z, z.clone(), tau).item() == pytest.approx(closed, rel=1e-5)
    if tau == 0.1:
        assert closed < 1e-3
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)
    assert invaspread_loss(z1, z2, tau).item() > closed + 1.0  # random embeddings are far from it


def tiny(*extra) -> nn.Module:
    return tiny_method("invaspread", ("method.proj_output_dim", 16), *extra)


def views(n: int = 6) -> list[torch.Tensor]:
    return random_views(n)


def test_method_loss_is_the_loss_of_its_embeddings_and_trains_the_encoder() -> None:
    m = tiny()
    x = views()
    m.eval()  # BatchNorm in eval mode: per-sample outputs, so the loss can be recomputed from parts
    out = m.training_step(x, 0)
    z1, z2 = m.projector(m.backbone(x[0])), m.projector(m.backbone(x[1]))
    assert out.loss.item() == pytest.approx(loop_loss(z1.double(), z2.double(), 0.1).item(), rel=1e-4)
    out.loss.backward()
    assert all(p.grad is not None for p in m.backbone.parameters() if p.requires_grad)
    assert 0.0 <= out.metrics["contrastive_acc"].item() <= 1.0


def test_contrastive_acc_is_one_when_copies_are_identical() -> None:
    m = tiny()
    m.eval()
    x = views()
    assert m.training_step([x[0], x[0].clone()], 0).metrics["contrastive_acc"].item() == 1.0


@pytest.mark.parametrize(("kind", "expected"), [("none", nn.Identity), ("linear", nn.Linear), ("mlp", nn.Sequential)])
def test_projector_ablation(kind: str, expected: type) -> None:
    m = tiny(("method.projector", kind), ("method.proj_hidden_dim", 32))
    assert isinstance(m.projector, expected)
    assert torch.isfinite(m.training_step(views(), 0).loss)


@pytest.mark.parametrize("name", ["invaspread", "invaspread-cifar"])
def test_recipes_load_and_build(name: str) -> None:
    r = load_recipe(name, [])
    assert r.method.projector == "linear" and r.method.proj_output_dim == 128 and r.method.temperature == 0.1
    assert r.num_views == 2 and r.train.batch_size == 128 and r.optim.weight_decay == 5e-4
    assert all(v.blur_prob == 0.0 and v.scale == [0.2, 1.0] for v in r.views)
    assert r.backbone.small_stem == (name == "invaspread-cifar")
    assert isinstance(tiny().projector, nn.Linear)


def test_bad_values_are_one_clear_error() -> None:
    with pytest.raises(RecipeError, match="temperature") as e:
        load_recipe("invaspread", [("method.temperature", -1.0)])
    assert "\n" not in str(e.value).strip()
    with pytest.raises(RecipeError, match="needs 2 views"):
        tiny(("views.0.count", 1))
