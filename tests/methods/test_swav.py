"""SwAV: Sinkhorn marginals, swapped prediction against a direct computation, prototypes (normalised, frozen in
the first epoch), the feature queue step by step, multi-crop batching, recipes and bad values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_one_line_error, tiny_method
from ssl_cli.config import load_recipe
from ssl_cli.losses.swav import sinkhorn, swapped_prediction
from ssl_cli.methods.multicrop import encode_by_size
from ssl_cli.train.optim import build_optimizer

SMALL = [("method.proj_hidden_dim", 32), ("method.proj_output_dim", 16), ("method.num_prototypes", 10)]


def cosine_scores(b: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, 16, generator=g), dim=1) @ F.normalize(torch.randn(k, 16, generator=g), dim=1).T


def test_sinkhorn_marginals_equal_partition() -> None:
    scores = cosine_scores(64, 8)
    q = sinkhorn(scores, 0.05, 3)
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)  # each sample: a distribution
    # after 3 iterations the prototypes are much closer to B/K each than plain softmax codes; converged, exactly
    softmax_gap = (torch.softmax(scores / 0.05, dim=1).sum(dim=0) - 8).abs().max()
    assert (q.sum(dim=0) - 8).abs().max() < 0.7 * softmax_gap
    q_conv = sinkhorn(scores, 0.05, 200)
    assert torch.allclose(q_conv.sum(dim=0), torch.full((8,), 8.0), rtol=1e-3)
    # the codes stay a rescaling of exp(s / eps): q_bk = u_b v_k exp(s_bk / eps)
    ratio = q_conv / torch.exp(scores / 0.05)
    rank1 = ratio / ratio[:, :1]
    assert torch.allclose(rank1, rank1[:1].expand_as(rank1), rtol=1e-3)


def test_sinkhorn_against_a_direct_alternating_normalisation() -> None:
    scores = cosine_scores(12, 5, seed=1).double()
    q = torch.exp(scores / 0.05)
    q = q / q.sum()
    for _ in range(3):
        q = q / q.sum(dim=0, keepdim=True) / 5  # prototypes (columns here)
        q = q / q.sum(dim=1, keepdim=True) / 12  # samples
    torch.testing.assert_close(sinkhorn(scores, 0.05, 3).double(), q * 12, rtol=1e-5, atol=1e-7)


def test_swapped_prediction_against_a_direct_computation() -> None:
    scores = [cosine_scores(6, 4, seed=s) for s in range(4)]  # 2 global + 2 local views
    codes = [sinkhorn(s) for s in scores[:2]]
    expected = 0.0
    for i in range(2):
        sub = 0.0
        for v in range(4):
            if v == i:
                continue
            for b in range(6):
                logp = torch.log_softmax(scores[v][b] / 0.1, dim=0)
                sub -= float((codes[i][b] * logp).sum()) / 6
        expected += sub / 3
    assert swapped_prediction(scores, codes, 0.1).item() == pytest.approx(expected / 2, rel=1e-5)


def test_codes_carry_no_gradient_and_prototypes_are_normalised_each_step() -> None:
    m = tiny_method("swav", *SMALL)
    with torch.no_grad():
        m.prototypes.weight.mul_(3.0)
    views = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    out = m.training_step(views, 0)
    assert torch.allclose(m.prototypes.weight.norm(dim=1), torch.ones(10), atol=1e-5)
    out.loss.backward()
    assert m.prototypes.weight.grad is not None and m.backbone.conv1[0].weight.grad is not None
    # the loss is linear in the codes: with codes detached, its gradient w.r.t. the target view's scores is
    # exactly what the predictions of the other view alone give (checked through a hand-made step)
    s = [torch.randn(5, 4, requires_grad=True) for _ in range(2)]
    q = [sinkhorn(x.detach()) for x in s]
    swapped_prediction(s, q, 0.1).backward()
    direct = -(q[1] - torch.softmax(s[0].detach() / 0.1, dim=1) * q[1].sum(1, keepdim=True)) / 0.1 / 5 / 2
    torch.testing.assert_close(s[0].grad, direct, rtol=1e-5, atol=1e-6)


def test_prototypes_frozen_during_the_first_epoch_only() -> None:
    m = tiny_method("swav", *SMALL, ("train.epochs", 4), ("method.freeze_prototypes_epochs", 1.0))
    opt = build_optimizer(m.param_groups(), m.recipe.optim, 8)
    total = 8  # 2 steps per epoch

    def step(i: int) -> torch.Tensor:
        out = m.training_step([torch.randn(8, 3, 32, 32) for _ in range(2)], i)  # normalises the prototypes
        before = m.prototypes.weight.detach().clone()
        opt.zero_grad()
        out.loss.backward()
        m.before_optimizer_step(i, total)
        opt.step()
        m.after_optimizer_step(i, total)
        return (m.prototypes.weight.detach() - before).abs().max()

    assert step(0) == 0 and step(1) == 0  # epoch 1: no update, not even weight decay
    assert step(2) > 0  # epoch 2: trained


def test_queue_fills_newest_first_from_its_start_epoch_and_joins_sinkhorn_when_full() -> None:
    m = tiny_method("swav", *SMALL, ("train.epochs", 4), ("method.queue_size", 16), ("method.queue_start_epoch", 1))
    total = 8  # 2 steps per epoch; the queue starts after step 1
    seen = []
    for i in range(5):
        out = m.training_step([torch.randn(8, 3, 32, 32) for _ in range(2)], i)
        new = m._new_features.clone()
        active = m.queue_active()
        m.after_optimizer_step(i, total)
        seen.append((new, active, int(m.queue_filled)))
        assert torch.isfinite(out.loss)
    assert [s[2] for s in seen] == [0, 8, 16, 16, 16]  # step 0 is epoch 0: nothing written
    assert [s[1] for s in seen] == [False, False, False, True, True]  # used only once full
    # newest first: the last step's 8 features on top, the one before below them
    torch.testing.assert_close(m.queue[:, :8], seen[4][0])
    torch.testing.assert_close(m.queue[:, 8:16], seen[3][0])


def test_multi_crop_batches_views_by_size_and_keeps_their_order() -> None:
    calls = []

    def encoder(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return x.mean(dim=(2, 3))

    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    out = encode_by_size(encoder, views)
    assert calls == [(8, 3, 32, 32), (8, 3, 16, 16)]
    for o, v in zip(out, views, strict=True):
        torch.testing.assert_close(o, v.mean(dim=(2, 3)))


def test_multi_crop_recipe_trains_a_step_with_local_views() -> None:
    m = tiny_method("swav", *SMALL, ("views.0.size", 32))
    assert m.recipe.num_views == 8
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 96, 96) for _ in range(6)]
    out = m.training_step(views, 0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and 0 < out.metrics["code_entropy"] <= math.log(10) + 1e-5


@pytest.mark.parametrize("name", ["swav", "swav-cifar"])
def test_recipes_load(name: str) -> None:
    r = load_recipe(name)
    assert r.method.num_prototypes == 3000 and r.method.epsilon == 0.05 and r.method.temperature == 0.1
    assert r.method.sinkhorn_iterations == 3


def test_too_few_views_and_bad_values_are_one_clear_error() -> None:
    assert_one_line_error(
        "needs at least 2 views", tiny_method, "swav-cifar", ("views.0.count", 1), ("backbone.small_stem", False)
    )
    assert_one_line_error("epsilon", load_recipe, "swav", [("method.epsilon", 0.0)])
    assert_one_line_error("num_prototypes", load_recipe, "swav", [("method.num_prototypes", 0)])


def _multi_crop_views(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(n, 3, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)
    ]


def test_projector_runs_once_over_every_crop_so_its_batchnorm_sees_all_crops() -> None:
    m = tiny_method("swav", *SMALL, ("views.0.size", 32), ("views.1.size", 16), ("views.1.count", 2))
    views = _multi_crop_views()
    calls = []
    m.projector.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    bn = next(x for x in m.projector.modules() if isinstance(x, torch.nn.BatchNorm1d))
    m.training_step(views, 0)
    assert calls == [16]  # one call over 2 x 4 global + 2 x 4 local crops, not one per crop size
    # its statistics: the running mean moved towards the mean over all 16 crops' hidden features
    m2 = tiny_method("swav", *SMALL, ("views.0.size", 32), ("views.1.size", 16), ("views.1.count", 2))
    feats = torch.cat(encode_by_size(m2.backbone, views))
    hidden = m2.projector[0](feats)
    torch.testing.assert_close(bn.running_mean, 0.1 * hidden.mean(0).detach(), rtol=1e-4, atol=1e-6)


def test_codes_come_from_the_first_num_targets_views_only() -> None:
    m = tiny_method("swav", *SMALL, ("views.0.size", 32), ("views.1.size", 16), ("views.1.count", 2))
    views = _multi_crop_views()
    loss = m.training_step(views, 0).loss
    with torch.no_grad():
        feats = torch.cat(encode_by_size(m.backbone, views))
    z = F.normalize(m.projector(feats), dim=1).split([4, 4, 4, 4])
    scores = [m.prototypes(v) for v in z]
    codes = [sinkhorn(s.detach(), 0.05, 3) for s in scores[:2]]
    expected = swapped_prediction(scores, codes, 0.1)
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-4, atol=1e-6)
    # codes from every view (local crops included) would give another loss
    every = swapped_prediction(scores, [sinkhorn(s.detach(), 0.05, 3) for s in scores], 0.1)
    assert abs(every.item() - expected.item()) > 1e-3
