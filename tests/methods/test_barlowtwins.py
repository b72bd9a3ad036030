"""Barlow Twins: the loss against explicit loops, the projector, per-view BatchNorm, the bias / BN rate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TINY, assert_one_line_error, random_views, tiny_method
from ssl_cli.config import load_recipe
from ssl_cli.errors import RecipeError
from ssl_cli.losses import BarlowTwinsLoss, cross_correlation
from ssl_cli.methods.barlowtwins import BarlowTwinsConfig
from ssl_cli.schedules import lr_schedule
from ssl_cli.train.optim import build_optimizer, effective_lr, set_lr
from ssl_cli.train.pretrain import build_method

SMALL = [("method.proj_hidden_dim", 32), ("method.proj_output_dim", 16)]


def tiny(name: str = "barlowtwins", *extra) -> nn.Module:
    return tiny_method(name, *SMALL, *extra)


def views(n: int = 8) -> list[torch.Tensor]:
    return random_views(n)


def loop_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float, scale: float = 1.0, eps: float = 1e-5) -> float:
    """The paper's Eq. (1)-(2) with plain Python loops over samples b and features i, j (float64)."""
    n, d = z1.shape
    a, b = z1.double().tolist(), z2.double().tolist()

    def standardized(z: list[list[float]]) -> list[list[float]]:
        cols = []
        for i in range(d):
            col = [z[k][i] for k in range(n)]
            mean = sum(col) / n
            var = sum((v - mean) ** 2 for v in col) / n
            cols.append([(v - mean) / (var + eps) ** 0.5 for v in col])
        return cols  # d lists of n values

    ca, cb = standardized(a), standardized(b)
    total = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(ca[i][k] * cb[j][k] for k in range(n)) / n
            total += (1.0 - c_ij) ** 2 if i == j else lambd * c_ij**2
    return scale * total


def whitened(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """N x D with zero-mean, unit-variance, mutually uncorrelated columns: z^T z / N = I."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(dim=0))
    return q * n**0.5


def test_loss_matches_an_explicit_double_loop() -> None:
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(7, 5, generator=g) * 3 + 1, torch.randn(7, 5, generator=g)
    z2 = z2 + 0.5 * z1  # correlated views
    for lambd, scale in ((5e-3, 1.0), (0.3, 0.1)):
        got = BarlowTwinsLoss(lambd, scale)(z1, z2).item()
        assert got == pytest.approx(loop_loss(z1, z2, lambd, scale), rel=1e-5)


def test_identity_cross_correlation_for_whitened_identical_embeddings() -> None:
    z = whitened(64, 8)
    c = cross_correlation(z, z)
    torch.testing.assert_close(c, torch.eye(8), atol=1e-4, rtol=0)
    assert BarlowTwinsLoss(5e-3)(z, z).item() < 1e-6
    # standardisation is part of the loss: a shift and a per-feature scale change nothing
    assert BarlowTwinsLoss(5e-3)(3.0 * z + 2.0, z * torch.arange(1, 9)).item() < 1e-6


def test_lambda_weights_only_the_off_diagonal_terms() -> None:
    z = whitened(64, 6)
    flipped = z * torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0])  # C diagonal with two entries -1, off-diagonal 0
    for lambd in (0.0, 5e-3, 1.0):  # on-diagonal: 2 features x (1 - (-1))^2 = 8, whatever lambda
        assert BarlowTwinsLoss(lambd)(z, flipped).item() == pytest.approx(8.0, rel=1e-3)
    mixed = z.clone()
    mixed[:, 1] = z[:, 0]  # two identical features: C_01 = C_10 = 1 off the diagonal, C_11 = 0
    on, off = BarlowTwinsLoss(0.0).terms(mixed, mixed)
    assert on.item() == pytest.approx(0.0, abs=1e-4) and off.item() == pytest.approx(2.0, rel=1e-3)
    assert BarlowTwinsLoss(0.25)(mixed, mixed).item() == pytest.approx(0.5, rel=1e-3)
    assert BarlowTwinsLoss(0.25, scale=0.1)(mixed, mixed).item() == pytest.approx(0.05, rel=1e-3)


def test_projector_matches_the_reference_no_biases_and_parameter_free_output_bn() -> None:
    m = tiny()
    linears = [mod for mod in m.projector if isinstance(mod, nn.Linear)]
    norms = [mod for mod in m.projector if isinstance(mod, nn.BatchNorm1d)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(m.feature_dim, 32), (32, 32), (32, 16)]
    assert all(lin.bias is None for lin in linears)
    assert [bn.affine for bn in norms] == [True, True, False]  # hidden BN learned, output BN plain
    assert sum(isinstance(mod, nn.ReLU) for mod in m.projector) == 2
    assert m.loss.normalize is False  # the output BN already standardises: no second normalisation
    defaults = BarlowTwinsConfig()
    assert (defaults.proj_hidden_dim, defaults.proj_output_dim, defaults.proj_layers) == (8192, 8192, 3)
    assert defaults.lambd == 5e-3 and defaults.scale_loss == 1.0 and defaults.bias_lr_scale == pytest.approx(0.024)


def test_step_loss_uses_per_view_batch_statistics_and_both_branches_get_gradients() -> None:
    m = tiny("barlowtwins", ("method.lambd", 0.1))
    x1, x2 = (v.requires_grad_(True) for v in views(16))
    out = m.training_step([x1, x2], 0)
    # independent computation: each view through the projector without its output BN, then the loop loss
    pre = m.projector[:-1]
    with torch.no_grad():
        h1, h2 = pre(m.backbone(x1)), pre(m.backbone(x2))
        both = pre(m.backbone(torch.cat([x1, x2])))
    assert out.loss.item() == pytest.approx(loop_loss(h1, h2, 0.1), rel=1e-4)
    assert out.loss.item() != pytest.approx(loop_loss(*both.chunk(2), 0.1), rel=1e-3)  # not a joint forward
    on, off = out.metrics["on_diag"].item(), out.metrics["off_diag"].item()
    assert out.loss.item() == pytest.approx(on + 0.1 * off, rel=1e-5)
    out.loss.backward()  # no stop-gradient: both views' inputs receive gradient
    assert x1.grad.abs().sum() > 0 and x2.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["linear", "none"])
def test_projector_ablation_standardises_in_the_loss(kind: str) -> None:
    m = tiny("barlowtwins", ("method.projector", kind))
    assert m.loss.normalize is True
    x = views(16)
    out = m.training_step(x, 0)
    with torch.no_grad():
        z1, z2 = m.embed(x[0]), m.embed(x[1])
    assert out.loss.item() == pytest.approx(loop_loss(z1, z2, 5e-3), rel=1e-4)


def test_bias_and_bn_group_runs_at_0024_of_the_weights_rate_through_the_schedule() -> None:
    m = tiny()
    recipe = m.recipe
    groups = m.param_groups()
    weights, biases = groups
    assert weights.get("lr_scale", 1.0) == 1.0
    assert biases["lr_scale"] == pytest.approx(0.0048 / 0.2)
    assert biases["weight_decay"] == 0.0 and biases["lars_adapt"] is False
    bn_and_bias = {n for n, p in m.named_parameters() if p.ndim <= 1}
    assert set(biases["names"]) == bn_and_bias and not bn_and_bias & set(weights["names"])
    batch = 64
    optimizer = build_optimizer(groups, recipe.optim, batch)
    lrs = lr_schedule(
        recipe.schedule.model_copy(update={"warmup_epochs": 2.0}), effective_lr(recipe.optim, batch), 5, 6
    )
    for step in (0, 3, 9, 10, 17, 29):
        set_lr(optimizer, float(lrs[step]))
        w, b = optimizer.param_groups
        assert w["lr"] == pytest.approx(float(lrs[step]))
        assert b["lr"] == pytest.approx(0.024 * float(lrs[step]))
    assert lrs[10].item() == pytest.approx(0.2 * batch / 256)  # peak after warm-up: 0.2 x B/256, biases 0.0048 x B/256


def test_bias_lr_scale_needs_a_separate_bias_group() -> None:
    with pytest.raises(RecipeError, match="bias_lr_scale: needs optim.exclude_bias_norm") as info:
        tiny("barlowtwins", ("optim.exclude_bias_norm", False))
    assert "\n" not in str(info.value)
    m = tiny("barlowtwins", ("optim.exclude_bias_norm", False), ("method.bias_lr_scale", 1.0))
    assert [g.get("lr_scale", 1.0) for g in m.param_groups()] == [1.0]


def test_recipes_load_with_the_paper_and_cifar_settings() -> None:
    r = load_recipe("barlowtwins")
    assert (r.optim.name, r.optim.lr, r.optim.weight_decay, r.optim.lr_scaling) == ("lars", 0.2, 1.5e-6, "linear")
    assert (r.train.batch_size, r.train.epochs, r.schedule.warmup_epochs) == (2048, 1000, 10)
    assert r.optim.exclude_bias_norm and r.backbone.name == "resnet50"
    assert [v.count for v in r.views] == [1, 1]
    assert [(v.blur_prob, v.solarize_prob) for v in r.views] == [(1.0, 0.0), (0.1, 0.2)]
    jitter = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
    assert all(v.jitter() == jitter and v.jitter_prob == 0.8 and v.grayscale_prob == 0.2 for v in r.views)
    c = load_recipe("barlowtwins-cifar")
    assert c.method.name == "barlowtwins" and c.backbone.small_stem and all(v.size == 32 for v in c.views)
    assert (c.method.proj_output_dim, c.method.scale_loss, c.method.lambd) == (2048, 0.1, 0.0051)
    assert [(v.blur_prob, v.solarize_prob) for v in c.views] == [(0.0, 0.0), (0.0, 0.2)]
    m = tiny("barlowtwins-cifar", ("backbone.small_stem", False))
    assert torch.isfinite(m.training_step(views(), 0).loss)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("method.lambd=-1", r"method.lambd: Input should be greater than or equal to 0"),
        ("method.scale_loss=0", r"method.scale_loss: Input should be greater than 0"),
        ("method.bias_lr_scale=0", r"method.bias_lr_scale: Input should be greater than 0"),
        ("views.1.count=2", r"needs 2 views"),
    ],
)
def test_bad_values_give_one_clear_line(override: str, pattern: str) -> None:
    assert_one_line_error(pattern, lambda: build_method(load_recipe("barlowtwins", [*TINY, *SMALL, override])))
