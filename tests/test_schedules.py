"""Per-step learning-rate and momentum schedules (ssl_cli.schedules)."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_cli.config.schema import ScheduleConfig
from ssl_cli.schedules import constant_schedule, cosine_schedule, lr_schedule, momentum_schedule, step_schedule


def test_cosine_schedule_values():
    s = cosine_schedule(1.0, 0.1, total_steps=110, warmup_steps=10)
    assert s.dtype == torch.float64 and s.shape == (110,)
    assert s[0].item() == 0.0
    assert s[5].item() == pytest.approx(0.5)
    assert s[9].item() == pytest.approx(0.9)  # last warm-up step is (W-1)/W of base
    assert s[10].item() == pytest.approx(1.0)  # end of warm-up: cosine starts at base
    assert s[60].item() == pytest.approx(0.55)  # middle of the 100 cosine steps: (base + final) / 2
    assert s[-1].item() == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 99 / 100)))
    assert s[-1].item() > 0.1
    assert (s[:11].diff() > 0).all()  # warm-up rises
    assert (s[10:].diff() < 0).all()  # cosine falls
    assert (s[10:] >= 0.1).all()


def test_cosine_schedule_every_value():
    base, final, total, warm, start = 0.8, 0.02, 37, 7, 0.1
    s = cosine_schedule(base, final, total, warm, warmup_start=start)
    n = total - warm
    expected = [start + (base - start) * i / warm for i in range(warm)]
    expected += [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float64))


def test_cosine_schedule_without_warmup():
    s = cosine_schedule(0.5, 0.0, 4)
    torch.testing.assert_close(
        s,
        torch.tensor(
            [0.5, 0.25 * (1 + math.cos(math.pi / 4)), 0.25, 0.25 * (1 + math.cos(3 * math.pi / 4))],
            dtype=torch.float64,
        ),
    )


def test_cosine_schedule_warmup_start():
    s = cosine_schedule(1.0, 0.0, 20, warmup_steps=4, warmup_start=0.2)
    assert s[0].item() == pytest.approx(0.2)
    assert s[2].item() == pytest.approx(0.6)
    assert s[4].item() == pytest.approx(1.0)


def test_cosine_schedule_edge_cases():
    assert cosine_schedule(1.0, 0.0, 0).shape == (0,)
    assert cosine_schedule(1.0, 0.0, 0, warmup_steps=5).shape == (0,)
    # Warm-up as long as the run: the plain ramp, never reaching base.
    torch.testing.assert_close(
        cosine_schedule(1.0, 0.0, 4, warmup_steps=4),
        torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=torch.float64),
    )
    # Longer than the run: the ramp keeps its slope and is cut off.
    s = cosine_schedule(1.0, 0.0, 3, warmup_steps=10)
    torch.testing.assert_close(s, torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64))
    assert torch.isfinite(cosine_schedule(1.0, 0.0, 1)).all()
    assert cosine_schedule(1.0, 0.0, 1).tolist() == [1.0]
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, -1)
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, 10, warmup_steps=-1)


def test_constant_schedule():
    s = constant_schedule(0.4, 10, warmup_steps=4)
    assert s.dtype == torch.float64 and s.shape == (10,)
    torch.testing.assert_close(s[:4], torch.tensor([0.0, 0.1, 0.2, 0.3], dtype=torch.float64))
    assert (s[4:] == 0.4).all()
    assert (constant_schedule(0.4, 5) == 0.4).all()
    assert constant_schedule(0.4, 0).shape == (0,)
    torch.testing.assert_close(constant_schedule(0.4, 2, warmup_steps=4), torch.tensor([0.0, 0.1], dtype=torch.float64))
    assert constant_schedule(1.0, 3, warmup_steps=2, warmup_start=0.5).tolist() == [0.5, 0.75, 1.0]


def test_lr_schedule_cosine():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=1.0, min_lr=0.001)
    s = lr_schedule(cfg, base_lr=0.5, steps_per_epoch=10, epochs=5)
    assert s.shape == (50,)
    torch.testing.assert_close(s, cosine_schedule(0.5, 0.001, 50, warmup_steps=10))
    assert s[10].item() == pytest.approx(0.5)


def test_lr_schedule_fractional_warmup_and_constant():
    cfg = ScheduleConfig(name="constant", warmup_epochs=0.3)
    s = lr_schedule(cfg, base_lr=0.9, steps_per_epoch=10, epochs=2)
    assert s.shape == (20,)
    torch.testing.assert_close(s[:3], torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64))
    assert (s[3:] == 0.9).all()

    s = lr_schedule(ScheduleConfig(name="cosine"), base_lr=0.9, steps_per_epoch=7, epochs=3)
    assert s[0].item() == pytest.approx(0.9) and s.shape == (21,)


def test_step_schedule():
    s = step_schedule(0.8, 10, boundaries=[4, 7], gamma=0.5, warmup_steps=2)
    expected = [0.0, 0.4, 0.8, 0.8, 0.4, 0.4, 0.4, 0.2, 0.2, 0.2]
    torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float64))
    assert (step_schedule(0.3, 5, [], 0.1) == 0.3).all()
    assert step_schedule(0.3, 0, [2], 0.1).shape == (0,)


def test_lr_schedule_step_drops_at_epoch_milestones():
    # MoCo v1 / InstDisc: x0.1 from epoch 120 and again from 160 (epochs counted from 0), here scaled down
    cfg = ScheduleConfig(name="step", milestones=[3, 4], gamma=0.1)
    s = lr_schedule(cfg, base_lr=0.03, steps_per_epoch=5, epochs=5)
    assert s.shape == (25,)
    torch.testing.assert_close(s[:15], torch.full((15,), 0.03, dtype=torch.float64))
    torch.testing.assert_close(s[15:20], torch.full((5,), 0.003, dtype=torch.float64))
    torch.testing.assert_close(s[20:], torch.full((5,), 0.0003, dtype=torch.float64))
    assert ScheduleConfig().milestones == [] and ScheduleConfig().gamma == 0.1  # defaults: old recipes unchanged
    for bad in ({"milestones": [160, 120]}, {"milestones": [0]}, {"gamma": 0.0}, {"gamma": 1.5}):
        with pytest.raises(ValueError):
            ScheduleConfig(**bad)


def test_momentum_schedule():
    base, total = 0.996, 100
    m = momentum_schedule(base, 1.0, total)
    assert m.dtype == torch.float64 and m.shape == (total,)
    assert m[0].item() == pytest.approx(base)
    assert m[50].item() == pytest.approx(0.998)  # midpoint: (base + final) / 2
    k = 37
    assert m[k].item() == pytest.approx(1 - (1 - base) * (math.cos(math.pi * k / total) + 1) / 2)
    assert m[-1].item() == pytest.approx(1.0, abs=1e-5) and m[-1].item() < 1.0
    assert (m.diff() > 0).all()
    assert momentum_schedule(base, 1.0, 0).shape == (0,)


def test_momentum_schedule_other_final():
    m = momentum_schedule(0.99, 0.999, 10)
    assert m[0].item() == pytest.approx(0.99)
    assert m[5].item() == pytest.approx((0.99 + 0.999) / 2)
    assert (m <= 0.999).all()


def test_step_schedule_with_factors_relative_to_the_base() -> None:
    # InvaSpread's demo_seen.py: x0.1 from epoch 120, x0.05 from 160, x0.01 from 200 (not compounded)
    cfg = ScheduleConfig(name="step", milestones=[120, 160, 200], factors=[0.1, 0.05, 0.01])
    lr = lr_schedule(cfg, 0.03, steps_per_epoch=2, epochs=301)
    expected = [0.03 if e < 120 else 0.003 if e < 160 else 0.0015 if e < 200 else 0.0003 for e in range(301)]
    torch.testing.assert_close(lr[::2], torch.tensor(expected, dtype=torch.float64))
    compounded = lr_schedule(ScheduleConfig(name="step", milestones=[120, 160, 200], gamma=0.1), 0.03, 2, 301)
    assert compounded[2 * 170].item() == pytest.approx(0.03 * 0.01)  # gamma compounds: another schedule


def test_factors_need_one_value_per_milestone() -> None:
    with pytest.raises(ValueError, match="one factor per milestone"):
        ScheduleConfig(name="step", milestones=[120, 160], factors=[0.1])


def test_lr_schedule_warmup_start() -> None:
    # SwAV's 800-epoch script: linear from --start_warmup 0.3 to the peak over the warm-up, then the cosine
    cfg = ScheduleConfig(warmup_epochs=10, warmup_start=0.3, min_lr=0.0048)
    lr = lr_schedule(cfg, 4.8, steps_per_epoch=10, epochs=100)
    assert lr[0].item() == pytest.approx(0.3)
    assert lr[50].item() == pytest.approx(0.3 + (4.8 - 0.3) * 50 / 100)
    assert lr[100].item() == pytest.approx(4.8) and lr[-1].item() == pytest.approx(0.0048, rel=0.01)
    assert lr_schedule(ScheduleConfig(warmup_epochs=10), 4.8, 10, 100)[0].item() == 0.0  # unset: from 0
