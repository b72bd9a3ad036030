"""BYOL and BYOL + GroupNorm/WS: loss, symmetrisation, stop-gradient, EMA schedule, batch independence, recipes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import random_views, tiny_method
from ssl_cli.config import load_recipe
from ssl_cli.errors import RecipeError
from ssl_cli.heads import ProjectorConfig, mlp, projector
from ssl_cli.losses import normalized_mse
from ssl_cli.train.optim import build_optimizer

SMALL_HEADS = [("method.proj_hidden_dim", 64), ("method.proj_output_dim", 16), ("method.pred_hidden_dim", 32)]


def tiny(name: str = "byol", *extra) -> nn.Module:
    return tiny_method(name, ("backbone.small_stem", False), *SMALL_HEADS, *extra)


def views(n: int = 8, seed: int = 0) -> list[torch.Tensor]:
    return random_views(n, seed)


def perturb(module: nn.Module, seed: int = 1) -> None:
    """Move the online network away from the target, so a loss that used the wrong branch would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_normalized_mse_is_the_squared_distance_of_unit_vectors() -> None:
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g) * 3
    expected = torch.stack([((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum() for i in range(5)])
    torch.testing.assert_close(normalized_mse(p, z), expected)
    torch.testing.assert_close(normalized_mse(p, 2.5 * p), torch.zeros(5), atol=1e-6, rtol=0)  # scale-free
    torch.testing.assert_close(normalized_mse(p, -p), torch.full((5,), 4.0))


def test_loss_is_both_view_orders_against_the_target_network() -> None:
    m = tiny()
    perturb(m.backbone)
    perturb(m.projector, seed=2)
    x1, x2 = views()
    loss = m.training_step([x1, x2], 0).loss
    # recompute by hand; BatchNorm is in training mode with statistics per view, as in the method
    with torch.no_grad():
        p1 = m.predictor(m.projector(m.backbone(x1)))
        p2 = m.predictor(m.projector(m.backbone(x2)))
        t1 = m.target_projector(m.target_backbone(x1))
        t2 = m.target_projector(m.target_backbone(x2))

    def direction(p: torch.Tensor, t: torch.Tensor) -> float:
        return sum(float(((p[i] / p[i].norm() - t[i] / t[i].norm()) ** 2).sum()) for i in range(len(p))) / len(p)

    assert loss.item() == pytest.approx(direction(p1, t2) + direction(p2, t1), rel=1e-5)
    # symmetrised: swapping the views gives the same loss; one direction alone does not
    assert m.training_step([x2, x1], 0).loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert abs(direction(p1, t2) - loss.item()) > 1e-3
    # the target, not the online projection, is regressed (they differ after the perturbation)
    with torch.no_grad():
        z2 = m.projector(m.backbone(x2))
        z1 = m.projector(m.backbone(x1))
    assert abs(direction(p1, z2) + direction(p2, z1) - loss.item()) > 1e-3


def test_target_starts_equal_and_gets_no_gradient_nor_optimizer_slot() -> None:
    m = tiny()
    online = dict(m.backbone.state_dict()) | {f"p.{k}": v for k, v in m.projector.state_dict().items()}
    target = dict(m.target_backbone.state_dict()) | {f"p.{k}": v for k, v in m.target_projector.state_dict().items()}
    assert online.keys() == target.keys()
    assert all(torch.equal(online[k], target[k]) for k in online)
    m.training_step(views(), 0).loss.backward()
    for part in (m.target_backbone, m.target_projector):
        assert all(not p.requires_grad and p.grad is None for p in part.parameters())
    for part in (m.backbone, m.projector, m.predictor):  # the online network learns
        assert all(p.grad is not None for p in part.parameters())
        assert sum(float(p.grad.abs().sum()) for p in part.parameters()) > 0
    in_optimizer = {id(p) for g in m.param_groups() for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in [*m.target_backbone.parameters(), *m.target_projector.parameters()])
    assert not any(n.startswith("target_") for g in m.param_groups() for n in g["names"])


def test_target_batchnorm_runs_in_training_mode_like_the_official_code() -> None:
    m = tiny()
    m.train()
    bn = next(x for x in m.target_backbone.modules() if isinstance(x, nn.BatchNorm2d))
    before = int(bn.num_batches_tracked)
    m.training_step(views(), 0)
    assert m.target_backbone.training and int(bn.num_batches_tracked) == before + 2  # one forward per view


def test_ema_follows_the_cosine_tau_schedule_step_by_step() -> None:
    m = tiny("byol", ("method.momentum", 0.9))
    opt = build_optimizer(m.param_groups(), m.recipe.optim, 8)
    total = 10
    for step in range(3):
        before = [p.clone() for p in [*m.target_backbone.parameters(), *m.target_projector.parameters()]]
        m.training_step(views(seed=step), step).loss.backward()
        opt.step()
        opt.zero_grad()
        online = [p.detach().clone() for p in [*m.backbone.parameters(), *m.projector.parameters()]]
        m.after_optimizer_step(step, total)
        tau = 1.0 - (1.0 - 0.9) * (math.cos(math.pi * step / total) + 1.0) / 2.0  # BYOL Sec. 3.2
        assert m.tau(step, total) == pytest.approx(tau)
        after = [*m.target_backbone.parameters(), *m.target_projector.parameters()]
        for t, t0, o in zip(after, before, online, strict=True):
            torch.testing.assert_close(t, tau * t0 + (1.0 - tau) * o)
    assert m.tau(0, total) == pytest.approx(0.9) and m.tau(total - 1, total) > 0.997


def test_groupnorm_variant_has_no_batch_statistics_anywhere() -> None:
    m = tiny("byol-gn")
    assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())
    assert any(isinstance(x, nn.GroupNorm) for x in m.predictor.modules())
    assert any(isinstance(x, nn.GroupNorm) for x in m.projector.modules())
    perturb(m.backbone)
    m.train()
    x1, x2 = views(6)
    # every sample's features and loss term are the same alone as in the batch (training mode)
    with torch.no_grad():
        z_batch, p_batch = m.online(x1)
        t_batch = m.target(x2)
        for i in range(6):
            z_i, p_i = m.online(x1[i : i + 1])
            torch.testing.assert_close(z_i, z_batch[i : i + 1], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(p_i, p_batch[i : i + 1], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(m.target(x2[i : i + 1]), t_batch[i : i + 1], rtol=1e-4, atol=1e-5)
        loss = m.training_step([x1, x2], 0).loss
        singles = [m.training_step([x1[i : i + 1], x2[i : i + 1]], 0).loss for i in range(6)]
    torch.testing.assert_close(loss, torch.stack(singles).mean(), rtol=1e-4, atol=1e-5)


def test_batchnorm_byol_features_do_depend_on_the_batch() -> None:
    # the control for the test above: with BatchNorm, a sample alone is normalised differently
    m = tiny("byol")
    m.train()
    x = views(6)[0]
    with torch.no_grad():
        z_batch, _ = m.online(x)
        z_part, _ = m.online(x[:3])
    assert not torch.allclose(z_part, z_batch[:3], atol=1e-3)


def test_groupnorm_heads_option_keeps_batchnorm_default() -> None:
    cfg = ProjectorConfig(name="x", proj_hidden_dim=64, proj_output_dim=8)
    assert isinstance(projector(cfg, 16)[0][1], nn.BatchNorm1d)
    assert cfg.proj_norm == "batchnorm"  # what runs saved before the key existed were trained with
    gn = mlp([16, 4096, 8], norm="groupnorm")
    assert isinstance(gn[1], nn.GroupNorm) and gn[1].num_groups == 32
    narrow = mlp([16, 32, 8], norm="groupnorm")[1]
    assert 32 // narrow.num_groups >= 16  # never a one-channel group (which would output zeros)


def test_recipes_load_and_build() -> None:
    r = load_recipe("byol")
    assert (r.optim.name, r.optim.lr, r.optim.weight_decay, r.optim.exclude_bias_norm) == ("lars", 0.2, 1.5e-6, True)
    assert (r.train.batch_size, r.train.epochs, r.schedule.warmup_epochs) == (4096, 1000, 10)
    assert (r.method.proj_hidden_dim, r.method.proj_output_dim, r.method.pred_hidden_dim) == (4096, 256, 4096)
    assert r.method.momentum == 0.996
    v1, v2 = r.views
    assert (v1.count, v2.count) == (1, 1)
    assert v1.jitter() == v2.jitter() == {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
    assert (v1.blur_prob, v1.solarize_prob, v2.blur_prob, v2.solarize_prob) == (1.0, 0.0, 0.1, 0.2)
    c = load_recipe("byol-cifar")
    assert c.backbone.small_stem and c.views[0].size == 32 and c.views[1].solarize_prob == 0.2
    for name in ("byol-gn", "byol-gn-cifar"):
        g = load_recipe(name)
        assert g.backbone.norm == "groupnorm_ws" and g.method.proj_norm == "groupnorm"
    for name in ("byol", "byol-cifar", "byol-gn", "byol-gn-cifar"):
        assert tiny(name).training_step(views(4), 0).loss.isfinite()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (("method.momentum", 1.5), r"method\.momentum"),
        (("method.pred_hidden_dim", 0), r"method\.pred_hidden_dim"),
        (("method.proj_norm", "layernorm"), r"method\.proj_norm"),
    ],
)
def test_bad_values_give_one_line_errors(override, message) -> None:
    with pytest.raises(RecipeError, match=message) as e:
        load_recipe("byol", [override])
    assert "\n" not in str(e.value)


def test_tau_final_below_tau_base_is_rejected() -> None:
    with pytest.raises(RecipeError, match="momentum_final") as e:
        load_recipe("byol", [("method.momentum_final", 0.9)])
    assert "\n" not in str(e.value)
