"""SimSiam: loss, stop-gradient (by gradients), heads, fixed-rate predictor, collapse monitor, recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY, random_views, tiny_method
from ssl_cli.artifacts.checkpoint import read_checkpoint
from ssl_cli.config import load_recipe
from ssl_cli.errors import RecipeError
from ssl_cli.losses import negative_cosine, normalized_std, simsiam_loss
from ssl_cli.schedules import lr_schedule
from ssl_cli.train.optim import build_optimizer, set_lr
from ssl_cli.train.pretrain import pretrain

SMALL_HEADS = [("method.proj_hidden_dim", 32), ("method.proj_output_dim", 32), ("method.pred_hidden_dim", 8)]


def tiny(name: str = "simsiam", *extra) -> nn.Module:
    return tiny_method(name, ("backbone.small_stem", False), *SMALL_HEADS, *extra)


def views(n: int = 8, seed: int = 0) -> list[torch.Tensor]:
    return random_views(n, seed)


def test_loss_matches_an_explicit_loop() -> None:
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(5, 6, generator=g) for _ in range(4))

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b / (a.norm() * b.norm()))

    expected = -0.5 * sum(cos(p1[i], z2[i]) for i in range(5)) / 5 - 0.5 * sum(cos(p2[i], z1[i]) for i in range(5)) / 5
    assert simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(expected, rel=1e-5)
    assert negative_cosine(p1, 3 * p1).item() == pytest.approx(-1.0)  # the minimum, whatever the scale


def test_stop_gradient_targets_receive_no_gradient_from_their_own_term() -> None:
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(4, 6, generator=g).requires_grad_() for _ in range(4))
    simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None  # z only serves as a (detached) target
    # the prediction's gradient is the analytic one of -cos/2N: (z/|z| - cos * p/|p|) / |p|, negated
    pn, zn = F.normalize(p1.detach(), dim=1), F.normalize(z2.detach(), dim=1)
    cosine = (pn * zn).sum(1, keepdim=True)
    expected = -0.5 / 4 * (zn - cosine * pn) / p1.detach().norm(dim=1, keepdim=True)
    torch.testing.assert_close(p1.grad, expected)


def test_method_gradients_equal_the_detached_computation_and_differ_without_it() -> None:
    m = tiny()
    x1, x2 = views()

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        m.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in m.backbone.parameters()]

    method = grads(m.training_step([x1, x2], 0).loss)
    z1, p1 = m.encode(x1)
    z2, p2 = m.encode(x2)
    manual = grads(
        -0.5 * F.cosine_similarity(p1, z2.detach()).mean() - 0.5 * F.cosine_similarity(p2, z1.detach()).mean()
    )
    for a, b in zip(method, manual, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    z1, p1 = m.encode(x1)
    z2, p2 = m.encode(x2)
    no_stop = grads(-0.5 * F.cosine_similarity(p1, z2).mean() - 0.5 * F.cosine_similarity(p2, z1).mean())
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(method, no_stop, strict=True))


def test_heads_follow_the_paper() -> None:
    m = tiny()
    linears = [x for x in m.projector if isinstance(x, nn.Linear)]
    assert len(linears) == 3 and isinstance(m.projector[-1], nn.BatchNorm1d) and not m.projector[-1].affine
    kinds = [type(x).__name__ for x in m.predictor]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]  # no BN on the predictor's output
    assert m.predictor[0].bias is None and m.predictor[-1].bias is not None
    assert (m.predictor[0].in_features, m.predictor[0].out_features, m.predictor[-1].out_features) == (32, 8, 32)


def test_predictor_group_keeps_its_rate_while_the_rest_decays() -> None:
    m = tiny()
    groups = m.param_groups()
    pred = {id(p) for p in m.predictor.parameters()}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= pred if g.get("fixed_lr") else not ids & pred
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in m.parameters()}
    opt = build_optimizer(groups, m.recipe.optim, 512)
    base = 0.05 * 512 / 256
    for lr in lr_schedule(m.recipe.schedule, base, steps_per_epoch=5, epochs=4).tolist():
        set_lr(opt, lr)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(base if g["fixed_lr"] else lr)
    assert min(g["lr"] for g in opt.param_groups) < 0.05 * base  # the scheduled groups have decayed
    unfixed = tiny("simsiam", ("method.fix_pred_lr", False))
    assert not any(g.get("fixed_lr") for g in unfixed.param_groups())


def test_a_real_run_keeps_the_predictor_rate_and_logs_the_collapse_monitor(image_folder: Path, tmp_path: Path) -> None:
    recipe = load_recipe(
        "simsiam", [*TINY, *SMALL_HEADS, ("train.batch_size", 8), ("train.epochs", 2), ("optim.lr_scaling", "none")]
    )
    result = pretrain(recipe, str(image_folder), tmp_path / "run")
    groups = read_checkpoint(result.checkpoint).meta["optim_groups"]
    pred = [g for g in groups if g["fixed_lr"]]
    rest = [g for g in groups if not g["fixed_lr"]]
    assert pred and rest
    assert all(g["lr"] == pytest.approx(0.05) for g in pred)
    # the last of 6 cosine steps: 0.05 * (1 + cos(5 pi / 6)) / 2
    assert all(g["lr"] == pytest.approx(0.05 * (1 + math.cos(5 * math.pi / 6)) / 2) for g in rest)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(0.0 < r["z_std"] <= 1.0 for r in records)


def test_collapse_monitor() -> None:
    collapsed = torch.ones(64, 16) * torch.randn(1, 16)
    assert normalized_std(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    # one direction at different scales is still collapsed once normalised
    assert normalized_std(collapsed * (torch.rand(64, 1) + 0.5)).item() == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    d = 256
    assert normalized_std(torch.randn(4096, d)).item() == pytest.approx(1 / math.sqrt(d), rel=0.03)
    m = tiny()
    x1, x2 = views()
    out = m.training_step([x1, x2], 0)
    z1, _ = m.encode(x1)
    z2, _ = m.encode(x2)
    expected = 0.5 * (normalized_std(z1) + normalized_std(z2))
    assert out.metrics["z_std"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert not out.metrics["z_std"].requires_grad


def test_recipes_load_and_build() -> None:
    r = load_recipe("simsiam")
    assert (r.optim.name, r.optim.lr, r.optim.weight_decay, r.optim.momentum) == ("sgd", 0.05, 1e-4, 0.9)
    assert (r.train.batch_size, r.train.epochs, r.schedule.name) == (512, 100, "cosine")
    m = r.method
    assert (m.proj_hidden_dim, m.proj_output_dim, m.proj_layers, m.proj_last_batchnorm) == (2048, 2048, 3, "plain")
    assert (m.pred_hidden_dim, m.fix_pred_lr) == (512, True)
    c = load_recipe("simsiam-cifar")
    assert (c.method.proj_layers, c.optim.lr, c.optim.weight_decay, c.train.batch_size) == (2, 0.03, 5e-4, 512)
    assert c.backbone.small_stem and c.views[0].size == 32 and c.views[0].blur_prob == 0.0
    for name in ("simsiam", "simsiam-cifar"):
        assert tiny(name).training_step(views(4), 0).loss.isfinite()


def test_bad_values_give_one_line_errors() -> None:
    for override, key in [
        (("method.pred_hidden_dim", 0), "pred_hidden_dim"),
        (("method.proj_layers", 1), "proj_layers"),
    ]:
        with pytest.raises(RecipeError, match=rf"method\.{key}") as e:
            load_recipe("simsiam", [override])
        assert "\n" not in str(e.value)
