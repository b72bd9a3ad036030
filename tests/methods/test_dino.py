"""DINO: the loss against a direct computation (same-view pairs skipped), centering step by step, the teacher
temperature schedule, the weight-normalised last layer (frozen in the first epoch), the EMA teacher on global crops
only, and the trainer options DINO needs: per-parameter gradient clipping and the weight-decay schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, assert_one_line_error, tiny_method, write_image_folder
from ssl_cli.config import load_recipe
from ssl_cli.heads import DINOHead, WeightNormLinear
from ssl_cli.losses.dino import dino_loss, teacher_probs, teacher_temperatures, updated_center
from ssl_cli.schedules import weight_decay_schedule
from ssl_cli.train.optim import build_optimizer, clip_gradients, set_weight_decay

SMALL = [("method.proj_hidden_dim", 32), ("method.proj_output_dim", 16), ("method.num_prototypes", 40)]


def multicrop_views(n: int = 8, local: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(n, 3, 16, 16, generator=g) for _ in range(local)
    ]


def dino_method(*overrides):
    views = [("views", [{"count": 1, "size": 32}, {"count": 1, "size": 32}, {"count": 2, "size": 16}])]
    return tiny_method("dino-resnet-cifar", ("backbone.small_stem", False), *SMALL, *views, *overrides)


def test_loss_against_a_direct_computation_skipping_same_view_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(5, 7, generator=g) for _ in range(4)]  # 2 global + 2 local
    targets = [torch.softmax(torch.randn(5, 7, generator=g), dim=1) for _ in range(2)]
    expected, pairs = 0.0, 0
    for t in range(2):
        for s in range(4):
            if s == t:
                continue
            for b in range(5):
                logp = torch.log_softmax(student[s][b] / 0.1, dim=0)
                expected -= float((targets[t][b] * logp).sum()) / 5
            pairs += 1
    assert pairs == 6
    assert dino_loss(student, targets, 0.1).item() == pytest.approx(expected / pairs, rel=1e-6)
    # the same-view pairs matter: including them gives another value
    with_same = expected / pairs * 6
    for t in range(2):
        with_same -= float((targets[t] * torch.log_softmax(student[t] / 0.1, dim=1)).sum(dim=1).mean())
    assert dino_loss(student, targets, 0.1).item() != pytest.approx(with_same / 8, rel=1e-3)


def test_a_student_view_gets_no_gradient_from_its_own_teacher_view() -> None:
    """With two global views and no local ones, student view 0 only predicts teacher view 1 (and vice versa)."""
    g = torch.Generator().manual_seed(1)
    student = [torch.randn(4, 6, generator=g, requires_grad=True) for _ in range(2)]
    targets = [torch.softmax(torch.randn(4, 6, generator=g), dim=1) for _ in range(2)]
    dino_loss(student, targets, 0.1).backward()
    # d/ds of mean_b CE(q, softmax(s / T)) / 2 pairs = (softmax(s / T) - q) / (T * B * 2)
    for s, t in ((0, 1), (1, 0)):
        expected = (torch.softmax(student[s].detach() / 0.1, dim=1) - targets[t]) / (0.1 * 4 * 2)
        torch.testing.assert_close(student[s].grad, expected, rtol=1e-5, atol=1e-7)


def test_centering_and_sharpening_of_the_teacher() -> None:
    g = torch.Generator().manual_seed(2)
    t, c = 0.1 * torch.randn(6, 5, generator=g), 0.1 * torch.randn(1, 5, generator=g)
    torch.testing.assert_close(teacher_probs(t, c, 0.04), torch.softmax((t - c) / 0.04, dim=1))

    # sharper at lower temperature: lower entropy
    def entropy(p: torch.Tensor) -> float:
        return float(-(p * p.clamp_min(1e-30).log()).sum(dim=1).mean())

    assert entropy(teacher_probs(t, c, 0.04)) < entropy(teacher_probs(t, c, 0.07))
    torch.testing.assert_close(updated_center(c, t, 0.9), 0.9 * c + 0.1 * t.mean(dim=0, keepdim=True))


def test_teacher_temperature_schedule_values() -> None:
    temps = teacher_temperatures(0.04, 0.07, 30, 100)
    assert temps.shape == (100,)
    assert temps[0] == pytest.approx(0.04) and temps[29] == pytest.approx(0.07)
    assert temps[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert torch.all(temps[30:] == 0.07)
    assert torch.all(temps[1:30] > temps[:29])  # a linear ramp
    # no warm-up: constant; a warm-up longer than the run keeps its slope and is cut off
    assert torch.all(teacher_temperatures(0.04, 0.07, 0, 5) == 0.07)
    short = teacher_temperatures(0.04, 0.07, 30, 3)
    torch.testing.assert_close(short, temps[:3])


def test_centre_follows_the_teacher_outputs_step_by_step() -> None:
    m = dino_method(("method.freeze_last_layer_epochs", 0.0))
    opt = build_optimizer(m.param_groups(), m.recipe.optim, 8)
    center = torch.zeros(1, 40)
    for step in range(2):
        views = multicrop_views(seed=step)
        with torch.no_grad():  # the teacher's raw outputs for the two global crops, computed independently
            raw = m.teacher_head(m.teacher_backbone(torch.cat(views[:2])))
        out = m.training_step(views, step)
        torch.testing.assert_close(m.center, center)  # nothing changes before the optimizer step
        out.loss.backward()
        m.before_optimizer_step(step, 10)
        opt.step()
        opt.zero_grad()
        m.after_optimizer_step(step, 10)
        center = 0.9 * center + 0.1 * raw.mean(dim=0, keepdim=True)
        torch.testing.assert_close(m.center, center, rtol=1e-5, atol=1e-6)
    assert "center" in m.state_dict()  # resumes with the run


def test_teacher_sees_global_crops_only_and_is_an_ema_of_the_student() -> None:
    m = dino_method(("method.momentum", 0.9), ("method.freeze_last_layer_epochs", 0.0))
    seen: list[tuple] = []
    m.teacher_backbone.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    student_seen: list[tuple] = []
    m.backbone.register_forward_pre_hook(lambda mod, args: student_seen.append(tuple(args[0].shape)))
    views = multicrop_views()
    out = m.training_step(views, 0)
    assert seen == [(16, 3, 32, 32)]  # both global crops in one batch, no local crop
    assert student_seen == [(16, 3, 32, 32), (16, 3, 16, 16)]  # same-size crops batched
    # the heads run once over all crops (MultiCropWrapper): BatchNorm in a head would see every crop together
    head_seen: list[int] = []
    m.head.register_forward_pre_hook(lambda mod, args: head_seen.append(args[0].shape[0]))
    m.teacher_head.register_forward_pre_hook(lambda mod, args: head_seen.append(-args[0].shape[0]))
    m.training_step(views, 0)
    assert head_seen == [-16, 32]  # teacher: the 2 x 8 global crops; student: all 4 x 8 crops in one call
    assert all(not p.requires_grad for p in [*m.teacher_backbone.parameters(), *m.teacher_head.parameters()])
    teacher_before = [p.clone() for p in m.teacher_head.parameters()]
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    out.loss.backward()
    assert all(p.grad is None for p in m.teacher_head.parameters())
    opt.step()
    m.after_optimizer_step(0, 10)
    momentum = m.momentum(0, 10)
    assert momentum == pytest.approx(0.9)
    for before, teacher, student in zip(teacher_before, m.teacher_head.parameters(), m.head.parameters(), strict=True):
        if student.requires_grad:
            torch.testing.assert_close(teacher, momentum * before + (1 - momentum) * student, rtol=1e-5, atol=1e-7)
        else:  # the fixed weight-norm gains
            assert torch.equal(teacher, before)


def test_last_layer_is_frozen_in_the_first_epoch_then_trains() -> None:
    m = dino_method(("method.freeze_last_layer_epochs", 1.0), ("train.epochs", 2), ("optim.weight_decay", 0.1))
    opt = build_optimizer(m.param_groups(), m.recipe.optim, 8)
    last = m.head.last_layer.weight_v
    start, mlp_start = last.detach().clone(), m.head.mlp[0].weight.detach().clone()
    total = 10  # 2 epochs of 5 steps: steps 0-4 are the first epoch
    for step in range(6):
        out = m.training_step(multicrop_views(seed=step), step)
        opt.zero_grad()
        out.loss.backward()
        m.before_optimizer_step(step, total)
        opt.step()
        m.after_optimizer_step(step, total)
        if step < 5:
            assert torch.equal(last, start), step  # bit-identical, weight decay included
    assert not torch.equal(last, start)
    assert not torch.equal(m.head.mlp[0].weight, mlp_start)


def test_weight_normalised_last_layer() -> None:
    layer = WeightNormLinear(6, 4, fixed_norm=True)
    with torch.no_grad():
        layer.weight_v.mul_(torch.arange(1.0, 5.0).unsqueeze(1))  # rows of different norms
    assert torch.allclose(layer.weight.norm(dim=1), torch.ones(4), atol=1e-6)
    assert not layer.weight_g.requires_grad
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), x @ F.normalize(layer.weight_v, dim=1).T)
    free = WeightNormLinear(6, 4, fixed_norm=False)
    assert free.weight_g.requires_grad
    with torch.no_grad():
        free.weight_g.fill_(2.0)
    assert torch.allclose(free.weight.norm(dim=1), torch.full((4,), 2.0), atol=1e-6)
    head = DINOHead(10, 30, hidden_dim=16, bottleneck_dim=8, layers=3)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert head(torch.randn(2, 10)).shape == (2, 30)


def test_teacher_has_no_stochastic_depth() -> None:
    views = [("views", [{"count": 2, "size": 32}])]
    m = tiny_method(
        "dino-cifar", *SMALL, *views, ("backbone.name", "vit_tiny_patch16_224"), ("backbone.drop_path_rate", 0.5)
    )
    m.train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.teacher_backbone(x), m.teacher_backbone(x))  # deterministic in training mode
        assert not torch.equal(m.backbone(x), m.backbone(x))  # the student keeps its drop path


def test_vit_takes_the_local_crops_through_a_dynamic_position_embedding() -> None:
    m = tiny_method("dino-cifar", *SMALL, ("backbone.name", "vit_tiny_patch16_224"), ("views.2.size", 16))
    assert [v.size for v in m.recipe.views] == [32, 32, 16]
    out = m.training_step(multicrop_views(n=2, local=6), 0)
    assert torch.isfinite(out.loss)


def test_per_parameter_gradient_clipping() -> None:
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.4])  # norms 5 and 0.5
    clip_gradients([a, b], 1.0)
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.8, 0.0]), rtol=1e-5, atol=1e-6)  # scaled to norm ~1
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))  # under the bound: untouched
    # unlike torch's global clipping, which would scale b too
    c = torch.nn.Parameter(torch.zeros(2))
    c.grad = torch.tensor([0.3, 0.4])
    d = torch.nn.Parameter(torch.zeros(3))
    d.grad = torch.tensor([3.0, 4.0, 0.0])
    torch.nn.utils.clip_grad_norm_([c, d], 1.0)
    assert not torch.allclose(c.grad, b.grad)


def test_weight_decay_schedule_applies_to_decayed_groups_only() -> None:
    recipe = load_recipe("dino", [("optim.weight_decay", 0.04), ("optim.weight_decay_end", 0.4)])
    wds = weight_decay_schedule(recipe.optim, 11)
    # the reference's cosine_scheduler: final + (base - final) (1 + cos(pi i / n)) / 2 for step i of n
    expected = [0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi * i / 11)) / 2 for i in range(11)]
    assert wds.tolist() == pytest.approx(expected)
    assert wds[0] == pytest.approx(0.04) and wds[-1] > 0.39
    assert weight_decay_schedule(load_recipe("simclr").optim, 5) is None
    w, bias = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.zeros(3))
    groups = [{"params": [w], "weight_decay": 0.04}, {"params": [bias], "weight_decay": 0.0}]
    opt = build_optimizer(groups, recipe.optim, 256)
    set_weight_decay(opt, 0.3, recipe.optim.weight_decay)
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([0.3, 0.0])


def test_recipes_and_bad_values() -> None:
    for name in ("dino", "dino-cifar", "dino-resnet", "dino-resnet-cifar"):
        r = load_recipe(name)
        assert r.method.name == "dino"
    vit = load_recipe("dino")
    assert (vit.optim.weight_decay, vit.optim.weight_decay_end, vit.optim.clip_grad) == (0.04, 0.4, 3.0)
    assert [v.count for v in vit.views] == [1, 1, 8] and vit.backbone.dynamic_img_size
    assert vit.method.num_prototypes == 65536 and vit.method.proj_output_dim == 256
    assert_one_line_error("weight_decay_end", load_recipe, "dino", [("optim.weight_decay", 0.0)])
    assert_one_line_error("num_targets", dino_method, ("method.num_targets", 5))
    assert_one_line_error("center_momentum", load_recipe, "dino", [("method.center_momentum", 1.5)])
    assert_one_line_error("clip_grad", load_recipe, "dino", [("optim.clip_grad", -1.0)])


def test_the_method_uses_the_epochs_teacher_temperature() -> None:
    m = dino_method(("method.warmup_teacher_temperature_epochs", 4), ("train.epochs", 10))
    for epoch in (0, 2, 7):
        m.epoch_start(epoch, lambda: iter(()))
        out = m.training_step(multicrop_views(), 0)
        expected = [0.04, 0.05, 0.06, 0.07][min(epoch, 3)]
        assert float(out.metrics["teacher_temperature"]) == pytest.approx(expected, rel=1e-5)


def test_pretrain_schedules_weight_decay_and_clips(tmp_path, monkeypatch) -> None:
    """``ssl pretrain`` sets the scheduled weight decay before each step and clips the gradients per parameter."""
    import ssl_cli.train.pretrain as trainer
    from ssl_cli.artifacts.checkpoint import read_checkpoint

    data = write_image_folder(tmp_path / "data", per_class=8, classes=4)
    clipped: list[float] = []
    original = trainer.clip_gradients

    def spy(params, max_norm):
        params = list(params)
        original(params, max_norm)
        clipped.append(max(float(p.grad.norm()) for p in params if p.grad is not None))

    monkeypatch.setattr(trainer, "clip_gradients", spy)
    overrides = [("backbone.small_stem", False), *SMALL, ("train.batch_size", 8), ("train.checkpoint_every", 0)]
    overrides += [("optim.weight_decay", 0.04), ("optim.weight_decay_end", 0.4), ("optim.clip_grad", 0.01)]
    recipe = load_recipe("dino-resnet-cifar", [*TINY, *overrides])
    result = trainer.pretrain(recipe, str(data), tmp_path / "run")
    assert len(clipped) == result.steps == 4 and max(clipped) <= 0.01 + 1e-6
    groups = read_checkpoint(result.checkpoint).meta["optim_groups"]
    wds = weight_decay_schedule(recipe.optim, 4)
    assert sorted(g["weight_decay"] for g in groups) == pytest.approx([0.0, float(wds[-1])])
