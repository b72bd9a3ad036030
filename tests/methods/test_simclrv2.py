"""SimCLR v2: the 3-layer head, NT-Xent shared with SimCLR, the momentum-encoder queue, the recipes, and
``ssl export --projector-layers`` (fine-tuning from the middle of the projection head)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import invoke
from safetensors import safe_open
from torch import nn

import ssl_cli
from conftest import TINY, random_views, tiny_method, write_image_folder
from ssl_cli.artifacts.checkpoint import read_checkpoint
from ssl_cli.config import load_recipe
from ssl_cli.errors import CheckpointError, RecipeError
from ssl_cli.eval.run import features, run_knn, run_probe, setup
from ssl_cli.export.backbone import export_backbone
from ssl_cli.heads import ScaleBatchNorm1d
from ssl_cli.losses import NTXentLoss
from ssl_cli.methods.simclr import SimCLR
from ssl_cli.methods.simclrv2 import SimCLRv2
from ssl_cli.train.checkpoint import save_checkpoint
from ssl_cli.train.optim import build_optimizer, effective_lr
from ssl_cli.train.pretrain import build_method, pretrain

HEAD = [("method.proj_hidden_dim", 32), ("method.proj_output_dim", 16)]


def tiny(*extra, name: str = "simclrv2") -> nn.Module:
    return tiny_method(name, *HEAD, *extra)


def views(n: int = 8, seed: int = 0) -> list[torch.Tensor]:
    return random_views(n, seed)


def ntxent_loop(z1: torch.Tensor, z2: torch.Tensor, tau: float, negatives: torch.Tensor | None = None) -> float:
    """NT-Xent written out anchor by anchor, in float64: -log(exp(s_pos/tau) / sum over k != i [+ queue])."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    neg = F.normalize(negatives.double(), dim=1) if negatives is not None else torch.zeros(0, z.shape[1]).double()
    n2, total = z.shape[0], 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n2) if k != i)
        denom += sum(math.exp(float(z[i] @ q) / tau) for q in neg)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / tau) / denom)
    return total / n2


# --- head and loss ----------------------------------------------------------------------------------------


def test_head_is_three_linear_layers_with_batchnorm_everywhere_and_no_final_relu() -> None:
    m = tiny(("method.queue_size", 0))
    kinds = [type(layer) for layer in m.projector]
    bn, scale_bn = nn.BatchNorm1d, ScaleBatchNorm1d
    assert kinds == [nn.Linear, bn, nn.ReLU, nn.Linear, bn, nn.ReLU, nn.Linear, scale_bn]
    linears = [layer for layer in m.projector if isinstance(layer, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(m.feature_dim, 32), (32, 32), (32, 16)]
    assert all(lin.bias is None for lin in linears)  # every linear layer feeds a BatchNorm: no bias
    assert all(bn.affine for bn in m.projector if isinstance(bn, nn.BatchNorm1d))
    # the official last BatchNorm (center=False): a learned scale, no shift
    assert m.projector[-1].weight is not None and m.projector[-1].bias is None
    assert all(bn.bias is not None for bn in m.projector[:-1] if isinstance(bn, nn.BatchNorm1d))
    assert m.projector[-1].num_features == 16
    assert m.proj_dim == 16
    assert not hasattr(m, "queue") and not hasattr(m, "key_backbone")  # queue off: plain SimCLR v2


def test_loss_is_simclrs_ntxent_on_the_same_projections() -> None:
    m = tiny(("method.queue_size", 0), ("method.temperature", 0.3))
    assert isinstance(m, SimCLR) and isinstance(m.loss, NTXentLoss)
    x = views()
    assert m.training_step(x, 0).loss.requires_grad
    m.eval()  # BatchNorm in eval mode: per-sample outputs, so the loss can be recomputed from parts
    z1, z2 = m.projector(m.backbone(x[0])), m.projector(m.backbone(x[1]))
    loss = m.training_step(x, 0).loss.item()
    assert loss == pytest.approx(NTXentLoss(0.3)(z1, z2).item(), rel=1e-5)
    assert loss == pytest.approx(ntxent_loop(z1.detach(), z2.detach(), 0.3), rel=1e-4)

    # SimCLR with the same head and weights gives the same loss: the two methods share one loss path
    v1 = tiny(("method.proj_layers", 3), name="simclr")
    v1.load_state_dict(m.state_dict())
    v1.config = v1.config.model_copy(update={"temperature": 0.3})
    v1.loss = NTXentLoss(0.3)
    assert v1.eval().training_step(x, 0).loss.item() == pytest.approx(loss, rel=1e-6)


def test_ntxent_with_extra_negatives_matches_explicit_loop_and_without_is_unchanged() -> None:
    g = torch.Generator().manual_seed(1)
    z1, z2, neg = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(7, 8, generator=g)
    loss = NTXentLoss(0.2)
    assert loss(z1, z2).item() == pytest.approx(ntxent_loop(z1, z2, 0.2), rel=1e-5)
    assert loss(z1, z2, neg).item() == pytest.approx(ntxent_loop(z1, z2, 0.2, neg), rel=1e-5)
    assert loss(z1, z2, neg).item() > loss(z1, z2).item()  # more negatives: a larger denominator
    z1.requires_grad_(True)
    neg.requires_grad_(True)
    loss(z1, z2, neg).backward()
    assert z1.grad is not None and neg.grad is None  # the queue is a constant of the loss


# --- the momentum encoder and its queue -------------------------------------------------------------------


def test_keys_get_no_gradient_and_the_optimizer_never_sees_the_memory_network() -> None:
    m = tiny(("method.queue_size", 64))
    m.training_step(views(), 0).loss.backward()
    for p in [*m.key_backbone.parameters(), *m.key_projector.parameters()]:
        assert not p.requires_grad and p.grad is None
    assert all(p.grad is not None for p in m.backbone.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in m.projector.parameters())
    assert m._new_keys is not None and not m._new_keys.requires_grad
    names = {n for g in m.param_groups() for n in g["names"]}
    assert names and not any(n.startswith(("key_", "queue")) for n in names)


def test_logits_include_queue_negatives_and_queue_gets_the_momentum_keys_after_the_step() -> None:
    m = tiny(("method.queue_size", 24), ("method.temperature", 0.2))
    g = torch.Generator().manual_seed(3)
    m.queue.keys.copy_(F.normalize(torch.randn(24, 16, generator=g), dim=1))  # known queue contents
    with torch.no_grad():  # let the memory network drift from the online one, as after some EMA steps
        for p in m.key_projector.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    queue_before = m.queue.keys.clone()
    x = views(6)
    m.eval()  # deterministic projections and keys, so both can be recomputed
    expected_keys = F.normalize(m.key_projector(m.key_backbone(torch.cat(x))), dim=1)
    z1, z2 = m.projector(m.backbone(x[0])).detach(), m.projector(m.backbone(x[1])).detach()
    assert not torch.allclose(expected_keys, F.normalize(torch.cat([z1, z2]), dim=1), atol=1e-3)

    out = m.training_step(x, 0)
    assert out.loss.item() == pytest.approx(ntxent_loop(z1, z2, 0.2, queue_before), rel=1e-4)
    assert out.loss.item() > ntxent_loop(z1, z2, 0.2) + 1e-3  # the queue negatives really are in the softmax
    assert torch.equal(m.queue.keys, queue_before)  # nothing written before the optimizer step

    m.after_optimizer_step(0, 10)
    torch.testing.assert_close(m.queue.keys[:12], expected_keys)  # both views' momentum keys, in order
    assert torch.equal(m.queue.keys[12:], queue_before[12:])
    assert m.queue.ptr.item() == 12
    m.training_step(views(6, seed=1), 1)
    m.after_optimizer_step(1, 10)
    assert m.queue.ptr.item() == 0  # 24 slots, wrapped around
    assert not torch.equal(m.queue.keys[12:], queue_before[12:])


def test_memory_network_starts_equal_and_follows_the_ema_rule_step_by_step() -> None:
    m = tiny(("method.queue_size", 64), ("method.momentum", 0.9))
    online = [*m.backbone.parameters(), *m.projector.parameters()]
    memory = [*m.key_backbone.parameters(), *m.key_projector.parameters()]
    assert len(online) == len(memory) and all(torch.equal(a, b) for a, b in zip(online, memory, strict=True))
    opt = build_optimizer(m.param_groups(), m.recipe.optim, 8)
    for step in range(3):
        before = [p.clone() for p in memory]
        m.training_step(views(seed=step), step).loss.backward()
        opt.step()
        opt.zero_grad()
        after = [p.detach().clone() for p in online]
        for p, b in zip(memory, before, strict=True):
            assert torch.equal(p, b)  # the optimizer step leaves the memory network alone
        m.after_optimizer_step(step, 10)
        for p, b, o in zip(memory, before, after, strict=True):
            torch.testing.assert_close(p, 0.9 * b + 0.1 * o)
    assert any(not torch.equal(a, b) for a, b in zip(online, memory, strict=True))


def test_state_dict_keeps_queue_and_memory_network_and_simclr_keys_are_unchanged() -> None:
    m = tiny(("method.queue_size", 16))
    m.training_step(views(), 0)
    m.after_optimizer_step(0, 10)
    clone = tiny(("method.queue_size", 16))
    clone.load_state_dict(m.state_dict())
    assert torch.equal(clone.queue.keys, m.queue.keys) and clone.queue.ptr.item() == m.queue.ptr.item()
    for a, b in zip(clone.key_projector.parameters(), m.key_projector.parameters(), strict=True):
        assert torch.equal(a, b)
    simclr_keys = set(tiny(name="simclr").state_dict())
    assert all(k.startswith(("backbone.", "projector.")) for k in simclr_keys)


# --- recipes ----------------------------------------------------------------------------------------------


def test_imagenet_recipe_has_the_papers_settings() -> None:
    r = load_recipe("simclrv2")
    m = r.method
    assert (m.name, m.proj_layers, m.proj_hidden_dim, m.proj_output_dim) == ("simclrv2", 3, 2048, 128)
    assert m.proj_batchnorm and m.proj_last_batchnorm == "scale"
    assert (m.temperature, m.queue_size, m.momentum) == (0.1, 65536, 0.999)
    assert (r.backbone.name, r.train.batch_size, r.train.epochs) == ("resnet50", 4096, 800)
    assert (r.optim.name, r.optim.lr_scaling, r.optim.weight_decay) == ("lars", "sqrt", 1e-4)
    assert effective_lr(r.optim, 4096) == pytest.approx(0.1 * math.sqrt(4096))  # 6.4
    assert effective_lr(r.optim, 1024) == pytest.approx(0.1 * math.sqrt(1024))
    assert r.schedule.warmup_epochs == pytest.approx(0.05 * 800)


def test_cifar_recipe_and_both_recipes_build() -> None:
    r = load_recipe("simclrv2-cifar")
    assert r.backbone.name == "resnet18" and r.backbone.small_stem
    assert all(v.size == 32 and v.blur_prob == 0.0 for v in r.views)
    assert r.method.queue_size == 0 and r.method.proj_layers == 3 and r.method.temperature == 0.5
    assert r.data.mean == [0.4914, 0.4822, 0.4465]
    assert effective_lr(r.optim, r.train.batch_size) == pytest.approx(2.0, rel=0.02)
    for name in ("simclrv2", "simclrv2-cifar"):
        m = build_method(load_recipe(name, [*TINY, *HEAD, ("backbone.small_stem", False), ("method.queue_size", 8)]))
        assert isinstance(m, SimCLRv2)
        assert m.training_step(views(4), 0).loss.isfinite()


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("method.queue_size", -1, "queue_size"),
        ("method.momentum", 1.5, "momentum"),
        ("method.proj_last_batchnorm", "bogus", "proj_last_batchnorm"),
        ("method.proj_layers", 1, "proj_layers"),
        ("method.temperature", 0.0, "temperature"),
    ],
)
def test_bad_recipe_values_give_one_line_errors(key: str, value: object, match: str) -> None:
    with pytest.raises(RecipeError, match=match) as err:
        load_recipe("simclrv2", [(key, value)])
    assert "\n" not in str(err.value)


# --- export from the middle of the projection head --------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """A tiny SimCLR v2 run (queue on, so the checkpoint also holds the memory network), one epoch."""
    root = tmp_path_factory.mktemp("simclrv2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = write_image_folder(root / "data", per_class=16, classes=2)
        recipe = load_recipe("simclrv2", [*TINY, *HEAD, ("method.queue_size", 64)])
        ckpt = Path(pretrain(recipe, str(data), root / "run").checkpoint)
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(root=root, ckpt=ckpt, data=str(data))


def _method_from(ckpt: Path) -> nn.Module:
    c = read_checkpoint(ckpt)
    method = build_method(c.recipe)
    method.load_state_dict(c.section("model"))
    return method.eval()


@pytest.mark.parametrize(("layers", "modules", "width"), [(1, 3, 32), (2, 6, 32), (3, 8, 16)])
def test_export_with_projector_layers_gives_the_heads_kth_layer(trained, tmp_path, layers, modules, width) -> None:
    out = tmp_path / "backbone.safetensors"
    summary = export_backbone(trained.ckpt, out, projector_layers=layers)
    assert summary["projector_layers"] == layers and summary["num_features"] == width

    model = ssl_cli.load_backbone(str(out))
    assert model.num_features == width and not model.training
    method = _method_from(trained.ckpt)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = method.projector[:modules](method.backbone(x))
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        assert not torch.allclose(model(x)[:, : min(width, 8)], method.backbone(x)[:, : min(width, 8)])

    config = json.loads(out.with_suffix(".json").read_text())
    assert config["projector_layers"] == layers and config["num_features"] == width
    assert "load_backbone" in config["projector_change"]
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert json.loads(meta["config"]) == config
    assert json.loads(meta["projector"])["num_layers"] == layers
    backbone_keys = set(read_checkpoint(trained.ckpt).section("model.backbone"))
    assert {k for k in keys if not k.startswith("projector.")} == backbone_keys
    assert not any(k.startswith(("key_", "queue", "backbone.")) for k in keys)


def test_knn_and_probe_run_on_the_heads_features(trained, tmp_path) -> None:
    out = tmp_path / "head.safetensors"
    export_backbone(trained.ckpt, out, projector_layers=1)
    s = setup(str(out), trained.data, trained.data, "cpu")
    assert s.model.num_features == 32
    train_f, _ = features(s, s.train, 16, 0)
    assert train_f.shape == (32, 32)  # 32 images, 32 features: the head's first layer, not the backbone's 96
    assert 0.0 <= run_knn(s, [5], 0.07, 16, 0)["top1"] <= 1.0
    assert 0.0 <= run_probe(s, 2, 0.1, 0.0, 16, False, 0)["top1"] <= 1.0


def test_plain_export_of_a_simclrv2_checkpoint_is_the_backbone_alone(trained, tmp_path) -> None:
    out = tmp_path / "plain.safetensors"
    summary = export_backbone(trained.ckpt, out)
    assert "projector_layers" not in summary
    config = json.loads(out.with_suffix(".json").read_text())
    assert "projector_layers" not in config
    model = ssl_cli.load_backbone(str(out))
    assert not hasattr(model, "head") and model.num_features == _method_from(trained.ckpt).feature_dim


def _checkpoint(tmp_path: Path, name: str, *extra) -> Path:
    """A training checkpoint of a freshly built method (no training needed for the refusal tests)."""
    recipe = load_recipe(name, [*TINY, *extra])
    method = build_method(recipe)
    path = tmp_path / f"{name}.safetensors"
    meta = {
        "recipe": recipe.to_dict(),
        "method": name,
        "backbone": {"name": recipe.backbone.name, "kwargs": {}, "small_stem": False, "norm": "batchnorm"},
        "preprocessing": {"mean": recipe.data.mean, "std": recipe.data.std, "input_size": [3, 32, 32]},
        "epoch": 0,
        "step": 0,
    }
    save_checkpoint(path, method, None, meta)
    return path


def test_export_refuses_too_many_layers_and_methods_without_an_mlp_projector(trained, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="only 3 linear layers") as err:
        export_backbone(trained.ckpt, tmp_path / "a.safetensors", projector_layers=4)
    assert "\n" not in str(err.value)
    linear = _checkpoint(tmp_path, "simclr", ("method.projector", "linear"), ("method.proj_output_dim", 16))
    with pytest.raises(CheckpointError, match="method 'simclr' has no MLP projector"):
        export_backbone(linear, tmp_path / "b.safetensors", projector_layers=1)
    assert not list(tmp_path.glob("[ab].*"))
    # an export is not a checkpoint: its head cannot be cut again
    export_backbone(trained.ckpt, tmp_path / "c.safetensors", projector_layers=1)
    with pytest.raises(CheckpointError, match="already an export"):
        export_backbone(tmp_path / "c.safetensors", tmp_path / "d.safetensors")
    # another method's MLP projector works the same way (MoCo v2: Linear-ReLU-Linear, no BatchNorm)
    moco = _checkpoint(tmp_path, "mocov2", *HEAD, ("method.queue_size", 16))
    export_backbone(moco, tmp_path / "e.safetensors", projector_layers=1)
    model, method = ssl_cli.load_backbone(str(tmp_path / "e.safetensors")), _method_from(moco)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), method.projector[:2](method.backbone(x)), rtol=0, atol=0)


def _invoke(*args) -> SimpleNamespace:
    r = invoke(*args)
    return SimpleNamespace(code=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def test_cli_projector_layers_option_and_one_line_errors(trained, tmp_path) -> None:
    out = tmp_path / "cli.safetensors"
    r = _invoke("export", trained.ckpt, "--out", out, "--projector-layers", 1, "--json")
    assert r.code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["projector_layers"] == 1 and summary["num_features"] == 32
    assert ssl_cli.load_backbone(str(out)).num_features == 32

    r = _invoke("export", trained.ckpt, "--out", tmp_path / "x.safetensors", "--projector-layers", 9)
    assert r.code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "only 3 linear layers" in lines[0]
