"""LARS, parameter groups, optimizer construction and learning-rate setting (ssl_cli.train.optim / lars)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from ssl_cli.config.schema import OptimConfig
from ssl_cli.methods.param_groups import param_groups
from ssl_cli.train.lars import LARS
from ssl_cli.train.optim import build_optimizer, effective_lr, set_lr

# --------------------------------------------------------------------------------------------- LARS


def _lars_reference_step(w, g, v, lr, momentum, wd, eta, adapt=True):
    """One LARS step written out independently in numpy; returns (new w, new momentum buffer)."""
    d = g + wd * w
    if adapt:
        w_norm = math.sqrt(float((w * w).sum()))
        d_norm = math.sqrt(float((d * d).sum()))
        if w_norm > 0 and d_norm > 0:
            d = d * (eta * w_norm / d_norm)
    v = d if v is None else momentum * v + d
    return w - lr * v, v


W0 = np.array([[1.0, 2.0], [2.0, 4.0]])  # ||W0|| = 5
G1 = np.array([[0.5, -1.0], [0.0, 2.0]])
G2 = np.array([[-1.5, 0.25], [3.0, -0.5]])


def _param(values) -> nn.Parameter:
    return nn.Parameter(torch.tensor(values, dtype=torch.float64))


def test_lars_one_step_matches_formula():
    lr, m, wd, eta = 0.5, 0.9, 0.1, 0.02
    p = _param(W0)
    opt = LARS([p], lr=lr, momentum=m, weight_decay=wd, trust_coefficient=eta)
    p.grad = torch.tensor(G1)
    opt.step()
    expected, _ = _lars_reference_step(W0, G1, None, lr, m, wd, eta)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=0, atol=1e-12)
    # The trust ratio uses the norm of the decayed gradient: eta * 5 / ||G1 + wd * W0||.
    d = G1 + wd * W0
    by_hand = W0 - lr * d * (eta * 5.0 / np.linalg.norm(d))
    np.testing.assert_allclose(p.detach().numpy(), by_hand, rtol=0, atol=1e-12)
    # ... and not the norm of the raw gradient (the other common variant).
    other = W0 - lr * d * (eta * 5.0 / np.linalg.norm(G1))
    assert not np.allclose(p.detach().numpy(), other, atol=1e-6)


def test_lars_clip_lr_takes_the_smaller_of_the_trust_rate_and_lr():
    """LARC's clip mode: the step is min(eta ||w|| / ||g||, lr) * g, not lr * eta ||w|| / ||g|| * g."""
    wd, eta = 0.1, 0.02
    d = G1 + wd * W0
    trust = eta * 5.0 / np.linalg.norm(d)  # ||W0|| = 5
    for lr in (10.0 * trust, 0.1 * trust):  # the trust rate is the smaller / the larger one
        p = _param(W0)
        opt = LARS([p], lr=lr, momentum=0.0, weight_decay=wd, trust_coefficient=eta, clip_lr=True)
        p.grad = torch.tensor(G1)
        opt.step()
        np.testing.assert_allclose(p.detach().numpy(), W0 - min(trust, lr) * d, rtol=0, atol=1e-12)
    # build_optimizer passes optim.clip_lr through
    from ssl_cli.config import load_recipe

    cfg = load_recipe("simclr", [("optim.clip_lr", True)]).optim
    assert build_optimizer([{"params": [_param(W0)]}], cfg, 256).param_groups[0]["clip_lr"] is True


def test_lars_two_steps_with_momentum_and_changing_lr():
    m, wd, eta = 0.9, 0.1, 0.02
    lr1, lr2 = 0.5, 0.2
    p = _param(W0)
    opt = LARS([p], lr=lr1, momentum=m, weight_decay=wd, trust_coefficient=eta)
    p.grad = torch.tensor(G1)
    opt.step()
    opt.param_groups[0]["lr"] = lr2
    p.grad = torch.tensor(G2)
    opt.step()

    w1, v1 = _lars_reference_step(W0, G1, None, lr1, m, wd, eta)
    w2, v2 = _lars_reference_step(w1, G2, v1, lr2, m, wd, eta)
    np.testing.assert_allclose(p.detach().numpy(), w2, rtol=0, atol=1e-12)
    np.testing.assert_allclose(opt.state[p]["momentum_buffer"].numpy(), v2, rtol=0, atol=1e-12)
    # lr multiplies the buffer (w -= lr * v), it is not folded into it (v = m v + lr g).
    lr_inside = w1 - (m * lr1 * v1 + lr2 * (v2 - m * v1))
    assert not np.allclose(p.detach().numpy(), lr_inside, atol=1e-6)


def test_lars_excluded_group_is_sgd_with_momentum():
    torch.manual_seed(0)
    adapted = nn.Parameter(torch.randn(4, 3))
    excluded = nn.Parameter(torch.randn(5))
    twin = nn.Parameter(excluded.detach().clone())
    lars = LARS(
        [
            {"params": [adapted], "weight_decay": 0.1},
            {"params": [excluded], "weight_decay": 0.0, "lars_adapt": False},
        ],
        lr=0.3,
        momentum=0.9,
        trust_coefficient=0.001,
    )
    sgd = torch.optim.SGD([twin], lr=0.3, momentum=0.9)
    for step, lr in enumerate([0.3, 0.3, 0.1, 0.05]):
        for group in lars.param_groups + sgd.param_groups:
            group["lr"] = lr
        grad = torch.randn(5) * (step + 1)
        adapted.grad = torch.randn(4, 3)
        excluded.grad = grad.clone()
        twin.grad = grad.clone()
        lars.step()
        sgd.step()
        torch.testing.assert_close(excluded, twin, rtol=0, atol=0)
    # The excluded parameter really moved (the comparison is not trivially true).
    assert not torch.equal(excluded, nn.Parameter(torch.zeros(5)))


def test_lars_excluded_group_with_weight_decay_matches_sgd():
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(6))
    twin = nn.Parameter(p.detach().clone())
    lars = LARS([p], lr=0.2, momentum=0.8, weight_decay=0.05, lars_adapt=False)
    sgd = torch.optim.SGD([twin], lr=0.2, momentum=0.8, weight_decay=0.05)
    for _ in range(3):
        g = torch.randn(6)
        p.grad, twin.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
    torch.testing.assert_close(p, twin, rtol=1e-6, atol=1e-7)


def test_lars_zero_norms_give_no_nan():
    zero_w = nn.Parameter(torch.zeros(3, 2))
    zero_g = nn.Parameter(torch.ones(3, 2))
    opt = LARS([zero_w, zero_g], lr=0.5, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001)
    zero_w.grad = torch.full((3, 2), 2.0)
    zero_g.grad = torch.zeros(3, 2)
    opt.step()
    # ||w|| = 0: trust ratio 1, a plain SGD step -0.5 * 2.
    torch.testing.assert_close(zero_w.detach(), torch.full((3, 2), -1.0))
    # ||g|| = 0: nothing moves.
    torch.testing.assert_close(zero_g.detach(), torch.ones(3, 2))
    # Second step: w is now non-zero, so the ratio is eta * ||w|| / ||g|| = 0.001 * 1 / 2 per element.
    opt.step()
    torch.testing.assert_close(zero_w.detach(), torch.full((3, 2), -1.0 - 0.5 * (0.9 * 2.0 + 0.001)))
    torch.testing.assert_close(zero_g.detach(), torch.ones(3, 2))
    assert torch.isfinite(opt.state[zero_g]["momentum_buffer"]).all()
    assert torch.isfinite(zero_w).all() and torch.isfinite(zero_g).all()


def test_lars_skips_params_without_grad():
    p = _param(W0)
    q = _param(W0)
    opt = LARS([p, q], lr=0.5, weight_decay=0.1)
    p.grad = torch.tensor(G1)
    opt.step()
    np.testing.assert_array_equal(q.detach().numpy(), W0)
    assert q not in opt.state
    assert not np.allclose(p.detach().numpy(), W0)


def test_lars_state_dict_round_trip():
    p = _param(W0)
    opt = LARS([p], lr=0.5, weight_decay=0.1)
    p.grad = torch.tensor(G1)
    opt.step()
    p2 = _param(p.detach().numpy())
    opt2 = LARS([p2], lr=0.5, weight_decay=0.1)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares tensors
    p.grad = torch.tensor(G2)
    p2.grad = torch.tensor(G2)
    opt.step()
    opt2.step()
    torch.testing.assert_close(p, p2, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ param_groups


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_param_groups_split_by_name():
    groups = param_groups(_model().named_parameters(), weight_decay=0.05, exclude_bias_norm=True)
    assert len(groups) == 2
    decay, no_decay = groups
    assert decay["names"] == ["0.weight", "2.weight"]
    assert no_decay["names"] == ["0.bias", "1.weight", "1.bias", "2.bias"]
    assert decay["weight_decay"] == 0.05 and decay.get("lars_adapt", True) is True
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_adapt"] is False
    assert all(p.ndim == 2 for p in decay["params"])
    assert len(decay["params"]) == len(decay["names"]) and len(no_decay["params"]) == len(no_decay["names"])


def test_param_groups_skip_frozen():
    model = _model()
    model[2].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    groups = param_groups(model.named_parameters(), weight_decay=0.05, exclude_bias_norm=True)
    names = [n for g in groups for n in g["names"]]
    assert "2.weight" not in names and "1.bias" not in names
    assert sorted(names) == sorted(["0.weight", "0.bias", "1.weight", "2.bias"])
    assert sum(len(g["params"]) for g in groups) == 4


def test_param_groups_without_exclusion_is_one_group():
    model = _model()
    groups = param_groups(model.named_parameters(), weight_decay=0.05, exclude_bias_norm=False)
    assert len(groups) == 1
    assert groups[0]["names"] == [n for n, _ in model.named_parameters()]
    assert groups[0]["weight_decay"] == 0.05


def test_param_groups_drop_empty_groups():
    only_norm = nn.BatchNorm1d(3)
    groups = param_groups(only_norm.named_parameters(), weight_decay=0.1, exclude_bias_norm=True)
    assert len(groups) == 1 and groups[0]["names"] == ["weight", "bias"]
    assert groups[0]["weight_decay"] == 0.0
    assert param_groups(iter([]), weight_decay=0.1, exclude_bias_norm=True) == []


# ---------------------------------------------------------------------------------- build_optimizer


def test_effective_lr():
    assert effective_lr(OptimConfig(lr=0.1, lr_scaling="linear"), 512) == pytest.approx(0.2)
    assert effective_lr(OptimConfig(lr=0.1, lr_scaling="linear"), 64) == pytest.approx(0.025)
    assert effective_lr(OptimConfig(lr=0.1, lr_scaling="sqrt"), 1024) == pytest.approx(0.2)
    assert effective_lr(OptimConfig(lr=0.1, lr_scaling="sqrt"), 512) == pytest.approx(0.1 * math.sqrt(2))
    assert effective_lr(OptimConfig(lr=0.1, lr_scaling="none"), 4096) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "name,cls", [("sgd", torch.optim.SGD), ("lars", LARS), ("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)]
)
@pytest.mark.parametrize("scaling,expected", [("linear", 0.2), ("sqrt", 0.1 * math.sqrt(2)), ("none", 0.1)])
def test_build_optimizer_class_and_lr(name, cls, scaling, expected):
    cfg = OptimConfig(name=name, lr=0.1, lr_scaling=scaling, weight_decay=0.01)
    groups = param_groups(_model().named_parameters(), cfg.weight_decay, cfg.exclude_bias_norm)
    opt = build_optimizer(groups, cfg, batch_size=512)
    assert type(opt) is cls
    assert len(opt.param_groups) == 2
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(expected)
        assert g["base_lr"] == pytest.approx(expected)
        assert g["lr_scale"] == 1.0 and g["fixed_lr"] is False
    assert opt.param_groups[0]["names"] == ["0.weight", "2.weight"]  # extra keys survive
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.param_groups[0]["weight_decay"] == 0.01


def test_build_optimizer_lr_scale_and_group_copy():
    model = _model()
    cfg = OptimConfig(name="sgd", lr=0.1, lr_scaling="linear")
    groups = [
        {"params": list(model[0].parameters()), "names": ["0.weight", "0.bias"]},
        {"params": list(model[2].parameters()), "lr_scale": 10.0},
    ]
    opt = build_optimizer(groups, cfg, batch_size=256)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert opt.param_groups[1]["lr"] == pytest.approx(1.0)
    assert opt.param_groups[1]["base_lr"] == pytest.approx(0.1)
    assert opt.param_groups[0]["weight_decay"] == cfg.weight_decay  # default from cfg
    assert opt.param_groups[0]["momentum"] == cfg.momentum
    assert "lr" not in groups[0] and "base_lr" not in groups[1]  # caller's dicts untouched


def test_build_optimizer_specific_settings():
    cfg = OptimConfig(name="adamw", lr=0.001, betas=[0.8, 0.95], weight_decay=0.05)
    opt = build_optimizer(param_groups(_model().named_parameters(), 0.05, True), cfg, 256)
    assert all(tuple(g["betas"]) == (0.8, 0.95) for g in opt.param_groups)

    cfg = OptimConfig(name="lars", lr=0.3, trust_coefficient=0.02, momentum=0.85)
    opt = build_optimizer(param_groups(_model().named_parameters(), 1e-6, True), cfg, 256)
    assert all(g["trust_coefficient"] == 0.02 and g["momentum"] == 0.85 for g in opt.param_groups)
    assert [g["lars_adapt"] for g in opt.param_groups] == [True, False]


def test_adam_adds_the_decay_to_the_gradient_and_adamw_decouples_it():
    """Two steps of each against Adam's formulas in float64 (AMDIM's official optimizer: Adam with L2 decay):
    ``adam`` feeds g + wd w to the moments, ``adamw`` shrinks w by lr wd w beside the moments of g alone."""
    lr, wd, (b1, b2), eps = 0.01, 0.1, (0.8, 0.999), 1e-8
    # gradients against the weights' signs and smaller than wd w: Adam's L2 term turns the first step around
    g = [
        torch.tensor([[-0.05, 0.1, -0.02]], dtype=torch.float64),
        torch.tensor([[0.01, 0.03, -0.2]], dtype=torch.float64),
    ]
    moved = {}
    for name in ("adam", "adamw"):
        w = nn.Parameter(torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64))
        cfg = OptimConfig(name=name, lr=lr, lr_scaling="none", betas=[b1, b2], weight_decay=wd)
        opt = build_optimizer(param_groups([("fc.weight", w)], wd, True), cfg, 256)
        assert opt.param_groups[0]["weight_decay"] == wd
        want, m, v = w.detach().clone(), torch.zeros_like(w.detach()), torch.zeros_like(w.detach())
        for t, grad in enumerate(g, start=1):
            w.grad = grad.clone()
            opt.step()
            step_grad = grad + wd * want if name == "adam" else grad
            if name == "adamw":
                want = want * (1 - lr * wd)
            m, v = b1 * m + (1 - b1) * step_grad, b2 * v + (1 - b2) * step_grad**2
            want = want - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
            torch.testing.assert_close(w.detach(), want, rtol=1e-9, atol=1e-9)
        moved[name] = w.detach()
    assert (moved["adam"] - moved["adamw"]).abs().min() > 1e-3  # the two rules are far apart


def test_build_optimizer_without_params_fails():
    with pytest.raises(ValueError):
        build_optimizer([], OptimConfig(), 256)


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw", "adam"])
def test_weight_decay_only_on_decayed_group(name):
    weight = nn.Parameter(torch.full((2, 3), 2.0))
    bias = nn.Parameter(torch.full((3,), 2.0))
    cfg = OptimConfig(name=name, lr=0.1, lr_scaling="none", weight_decay=0.5, momentum=0.9)
    groups = param_groups([("fc.weight", weight), ("fc.bias", bias)], cfg.weight_decay, True)
    opt = build_optimizer(groups, cfg, batch_size=256)
    weight.grad = torch.zeros_like(weight)
    bias.grad = torch.zeros_like(bias)
    opt.step()
    assert (weight < 2.0).all(), "decayed parameter must shrink on a zero gradient"
    torch.testing.assert_close(bias.detach(), torch.full((3,), 2.0), rtol=0, atol=0)
    if name in ("sgd", "adamw"):  # both shrink by lr * wd * w on the first step
        torch.testing.assert_close(weight.detach(), torch.full((2, 3), 2.0 - 0.1 * 0.5 * 2.0))


def test_optimizer_state_dict_with_extra_keys():
    cfg = OptimConfig(name="sgd")
    model = _model()
    opt = build_optimizer(param_groups(model.named_parameters(), 1e-4, True), cfg, 256)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["names"] == ["0.weight", "2.weight"]
    opt2 = build_optimizer(param_groups(model.named_parameters(), 1e-4, True), cfg, 256)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[1]["lars_adapt"] is False


# ------------------------------------------------------------------------------------------- set_lr


def test_set_lr_with_fixed_and_scaled_groups():
    model = _model()
    cfg = OptimConfig(name="sgd", lr=0.05, lr_scaling="linear")
    groups = [
        {"params": list(model[0].parameters())},
        {"params": list(model[1].parameters()), "fixed_lr": True},
        {"params": list(model[2].parameters()), "lr_scale": 10.0},
    ]
    opt = build_optimizer(groups, cfg, batch_size=512)  # base lr 0.1
    set_lr(opt, 0.01)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.1, 0.1])
    set_lr(opt, torch.tensor(0.002, dtype=torch.float64))  # a schedule entry works too
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.002, 0.1, 0.02])
    assert all(isinstance(g["lr"], float) for g in opt.param_groups)


def test_set_lr_fixed_with_scale_and_plain_optimizer():
    p, q = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))
    cfg = OptimConfig(name="lars", lr=0.2, lr_scaling="none")
    opt = build_optimizer([{"params": [p]}, {"params": [q], "fixed_lr": True, "lr_scale": 0.5}], cfg, 256)
    set_lr(opt, 0.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.0, 0.1])

    plain = torch.optim.SGD([p], lr=1.0)  # not built by build_optimizer: no lr_scale, not fixed
    set_lr(plain, 0.3)
    assert plain.param_groups[0]["lr"] == pytest.approx(0.3)


# --------------------------------------------------------------------------------------------- on the GPU


def _steps(opt: torch.optim.Optimizer, params: list[nn.Parameter], grads: list[list[torch.Tensor]]) -> None:
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = g.to(p.device, p.dtype)
        opt.step()


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_on_the_gpu_the_optimizers_run_fused_or_multi_tensor_and_step_as_written(name, gpu):
    """SGD and AdamW run fused on CUDA (one kernel for every parameter) and LARS multi-tensor; three steps with
    fixed gradients land where PyTorch's plain per-parameter loop (SGD, AdamW) or the LARS formula written out in
    numpy puts them, on the CPU in float64."""
    cfg = OptimConfig(name=name, lr=0.1, lr_scaling="none", weight_decay=0.01, momentum=0.9)
    model = _model().to(gpu)
    groups = param_groups(model.named_parameters(), cfg.weight_decay, cfg.exclude_bias_norm)
    opt = build_optimizer(groups, cfg, batch_size=256)
    if name != "lars":
        assert opt.param_groups[0]["fused"] is (True if gpu.type == "cuda" else None)
    g = torch.Generator().manual_seed(1)
    params = [p for group in opt.param_groups for p in group["params"]]
    start = [p.detach().double().cpu().clone() for p in params]
    grads = [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params] for _ in range(3)]
    _steps(opt, params, grads)
    if name == "lars":
        owners = [group for group in opt.param_groups for _ in group["params"]]
        for i, (p, group) in enumerate(zip(params, owners, strict=True)):
            w, v = start[i].numpy(), None
            for step in grads:
                w, v = _lars_reference_step(
                    w, step[i].numpy(), v, 0.1, 0.9, group["weight_decay"], cfg.trust_coefficient,
                    adapt=group.get("lars_adapt", True),
                )  # fmt: skip
            np.testing.assert_allclose(p.detach().cpu().double().numpy(), w, rtol=1e-5, atol=1e-6)
        return
    reference = [nn.Parameter(w.clone()) for w in start]
    wd = [group["weight_decay"] for group in opt.param_groups for _ in group["params"]]
    kind = torch.optim.SGD if name == "sgd" else torch.optim.AdamW
    extra = {"momentum": 0.9} if name == "sgd" else {}
    ref = kind([{"params": [p], "weight_decay": d} for p, d in zip(reference, wd, strict=True)], lr=0.1,
               foreach=False, **extra)  # fmt: skip
    _steps(ref, reference, grads)
    for p, r in zip(params, reference, strict=True):
        torch.testing.assert_close(p.detach().cpu().double(), r.detach(), rtol=1e-5, atol=1e-6)


def test_a_checkpoints_fused_optimizer_loads_into_the_cpus_plain_one(tmp_path):
    """A GPU run's optimizer (fused) continues on the CPU: how the step runs follows this machine, not the file."""
    from ssl_cli.train.checkpoint import IMPLEMENTATION_KEYS, load_optimizer

    cfg = OptimConfig(name="adamw", lr=0.1)
    groups = param_groups(_model().named_parameters(), cfg.weight_decay, cfg.exclude_bias_norm)
    opt = build_optimizer(groups, cfg, batch_size=256)

    class Saved:  # what read_checkpoint gives of a GPU run's file: fused groups, no state yet
        path = tmp_path / "last.safetensors"
        meta = {"optim_groups": [{**g, "params": list(range(len(g["params"]))), "fused": True}
                                 for g in opt.state_dict()["param_groups"]]}  # fmt: skip

        def section(self, name):
            return {}

    load_optimizer(opt, Saved())
    assert all(g["fused"] is None for g in opt.param_groups)
    assert "fused" in IMPLEMENTATION_KEYS
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()  # fused=True on CPU tensors would take another kernel path (or fail on older PyTorch)
