"""MoCo v1: the linear 128-d head, its defaults, the loss against an explicit loop, the recipes.

The machinery MoCo v1 and v2 share (momentum update, queue written after the optimizer step, shuffle-BN,
no gradient into the key encoder, state round trip) is tested once, through MoCo v2, in test_methods.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_one_line_error, random_views, tiny_method
from ssl_cli.config import load_recipe
from ssl_cli.methods import METHODS
from ssl_cli.methods.mocov1 import MoCoV1, MoCoV1Config
from ssl_cli.methods.mocov2 import MoCoV2, MoCoV2Config
from ssl_cli.schedules import lr_schedule


def tiny(name: str, *extra) -> nn.Module:
    return tiny_method(name, *extra)


def views(n: int = 8) -> list[torch.Tensor]:
    return random_views(n)


def test_defaults_are_the_papers() -> None:
    cfg = MoCoV1Config()
    assert (cfg.temperature, cfg.queue_size, cfg.momentum) == (0.07, 65536, 0.999)
    assert cfg.projector == "linear" and cfg.proj_output_dim == 128 and not cfg.symmetric
    # MoCo v2 is MoCo v1 with other defaults, not a copy: same machinery, MLP head without BN, tau 0.2
    assert issubclass(MoCoV2, MoCoV1) and METHODS["mocov1"] is MoCoV1 and METHODS["mocov2"] is MoCoV2
    v2 = MoCoV2Config()
    assert (v2.temperature, v2.queue_size, v2.momentum) == (0.2, 65536, 0.999)
    assert v2.projector == "mlp" and v2.proj_batchnorm is False


def test_head_is_one_linear_layer_to_128_and_the_key_head_its_copy() -> None:
    m = tiny("mocov1", ("method.queue_size", 32))
    assert isinstance(m.projector, nn.Linear) and isinstance(m.key_projector, nn.Linear)
    assert (m.projector.in_features, m.projector.out_features) == (m.feature_dim, 128)
    assert m.projector.bias is not None  # the replaced fc keeps its bias, as in the reference
    assert torch.equal(m.projector.weight, m.key_projector.weight) and not m.key_projector.weight.requires_grad
    assert m.queue.keys.shape == (32, 128)
    out = m.training_step(views(), 0)
    out.loss.backward()
    assert m.projector.weight.grad is not None and m.projector.weight.grad.abs().sum() > 0
    assert m.key_projector.weight.grad is None


def test_loss_matches_an_explicit_infonce_loop_at_tau_007() -> None:
    m = tiny("mocov1", ("method.queue_size", 12), ("method.shuffle_bn_splits", 1))
    m.eval()  # per-sample BatchNorm: queries and keys can be recomputed from the parts
    x = views(6)
    m.queue.enqueue(m.key(torch.randn(12, 3, 32, 32)))  # real keys as negatives, so the loss is not ~0
    queue = m.queue.keys.clone()
    out = m.training_step(x, 0)
    with torch.no_grad():
        q = F.normalize(m.projector(m.backbone(x[0])), dim=1)
        k = F.normalize(m.key_projector(m.key_backbone(x[1])), dim=1)
    tau, total, correct = 0.07, 0.0, 0
    for i in range(q.shape[0]):
        pos = float(q[i] @ k[i]) / tau
        negs = [float(q[i] @ queue[j]) / tau for j in range(queue.shape[0])]
        top = max([pos, *negs])
        total += -(pos - top - math.log(sum(math.exp(s - top) for s in [pos, *negs])))
        correct += int(pos > max(negs))
    assert out.loss.item() == pytest.approx(total / q.shape[0], rel=1e-4)
    assert out.metrics["contrastive_acc"].item() == pytest.approx(correct / q.shape[0])


def test_mocov2_checkpoint_names_unchanged_by_the_shared_base() -> None:
    m = tiny("mocov2", ("method.queue_size", 16))
    keys = set(m.state_dict())
    expected = {"queue.keys", "queue.ptr"}
    expected |= {f"{p}projector.{i}.{w}" for p in ("", "key_") for i in (0, 2) for w in ("weight", "bias")}
    assert expected <= keys
    assert {k.split(".")[0] for k in keys} == {"backbone", "projector", "key_backbone", "key_projector", "queue"}
    v1 = tiny("mocov1", ("method.queue_size", 16))
    assert {"projector.weight", "projector.bias", "key_projector.weight", "queue.keys"} <= set(v1.state_dict())


def test_recipe_has_the_paper_settings_and_step_schedule() -> None:
    r = load_recipe("mocov1")
    assert r.method.name == "mocov1" and r.backbone.name == "resnet50"
    assert (r.optim.name, r.optim.lr, r.optim.weight_decay, r.train.batch_size, r.train.epochs) == (
        "sgd",
        0.03,
        1e-4,
        256,
        200,
    )
    view = r.views[0]
    assert view.count == 2 and view.scale == [0.2, 1.0] and view.grayscale_prob == 0.2
    assert view.jitter_prob == 1.0 and view.jitter() == {
        "brightness": 0.4,
        "contrast": 0.4,
        "saturation": 0.4,
        "hue": 0.4,
    }
    assert view.blur_prob == 0.0 and view.solarize_prob == 0.0 and view.hflip_prob == 0.5
    lrs = lr_schedule(r.schedule, 0.03, steps_per_epoch=3, epochs=200)
    assert lrs[3 * 120 - 1].item() == pytest.approx(0.03)
    assert lrs[3 * 120].item() == pytest.approx(0.003)
    assert lrs[3 * 160 - 1].item() == pytest.approx(0.003)
    assert lrs[3 * 160].item() == pytest.approx(0.0003) and lrs[-1].item() == pytest.approx(0.0003)


def test_cifar_recipe_extends_and_builds() -> None:
    r = load_recipe("mocov1-cifar")
    assert r.method.name == "mocov1" and r.method.projector == "linear"
    assert (r.method.queue_size, r.method.momentum, r.method.temperature) == (4096, 0.99, 0.1)
    assert r.backbone.small_stem and r.views[0].size == 32 and r.views[0].blur_prob == 0.0
    assert r.schedule.name == "cosine" and r.train.batch_size == 512
    m = tiny("mocov1-cifar", ("method.queue_size", 64), ("backbone.small_stem", False))
    assert isinstance(m.projector, nn.Linear)
    assert torch.isfinite(m.training_step(views(), 0).loss)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("method.temperature=0", r"method.temperature: Input should be greater than 0"),
        ("method.queue_size=0", r"method.queue_size: Input should be greater than or equal to 1"),
        ("method.momentum=1.5", r"method.momentum: Input should be less than or equal to 1"),
        ("schedule.milestones=[160, 120]", r"schedule.milestones: .*strictly increasing"),
    ],
)
def test_bad_values_give_one_clear_line(override: str, pattern: str) -> None:
    assert_one_line_error(pattern, load_recipe, "mocov1", [override])
