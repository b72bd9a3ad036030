"""InstDisc: NCE loss and Z, memory-bank semantics, checkpoint / resume, the bank kNN monitor, recipes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import Interrupt

from conftest import TINY, tiny_method, write_image_folder
from ssl_cli.artifacts.checkpoint import read_checkpoint
from ssl_cli.config import load_recipe
from ssl_cli.errors import RecipeError
from ssl_cli.losses import MemoryBank, nce_loss
from ssl_cli.train.optim import build_optimizer
from ssl_cli.train.pretrain import build_method, pretrain

SMALL = [("method.proj_output_dim", 16), ("method.nce_k", 7)]


def tiny(*extra, n: int = 40, labels: torch.Tensor | None = None):
    m = tiny_method("instdisc", *SMALL, *extra)
    m.bind_data(n, labels)
    return m


def batch(b: int = 6, seed: int = 0) -> list[torch.Tensor]:
    return [torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))]


def fix_noise(m, noise: torch.Tensor) -> None:
    m.bank.sample_noise = lambda b, k: noise[:b, :k]


def reference_loss(f: torch.Tensor, bank: torch.Tensor, index, noise, tau: float, z: float) -> torch.Tensor:
    """The paper's NCE written out per sample, in float64: P = exp(v.f/tau)/Z, h = P/(P + m/n)."""
    f, bank = f.double(), bank.double()
    n, m = bank.shape[0], noise.shape[1]
    total = torch.zeros((), dtype=torch.float64)
    for b in range(f.shape[0]):
        p_data = torch.exp(bank[index[b]] @ f[b] / tau) / z
        total = total - torch.log(p_data / (p_data + m / n))
        for j in noise[b]:
            p = torch.exp(bank[j] @ f[b] / tau) / z
            total = total - torch.log(1 - p / (p + m / n))
    return total / f.shape[0]


def test_nce_loss_matches_the_reference_criterion() -> None:
    """Against NCECriterion's formula (P / (P + m Pn + eps), m Pn / (P + m Pn + eps))."""
    g = torch.Generator().manual_seed(1)
    p = torch.rand(5, 9, generator=g, dtype=torch.float64) * 0.01  # P values around 1/n
    n, m = 300, 8
    pn = 1.0 / n

    def criterion(eps: float) -> float:
        data = torch.log(p[:, 0] / (p[:, 0] + m * pn + eps)).sum()
        noise = torch.log(m * pn / (p[:, 1:] + m * pn + eps)).sum()
        return (-(data + noise) / 5).item()

    assert nce_loss(p.log(), n).item() == pytest.approx(criterion(0.0), rel=1e-9)
    assert nce_loss(p.log(), n).item() == pytest.approx(criterion(1e-7), rel=1e-4)  # the reference's eps guard


def test_loss_and_z_against_an_explicit_per_sample_computation() -> None:
    m = tiny()
    m.eval()  # BatchNorm in eval mode: per-sample features that can be recomputed
    index = torch.tensor([3, 17, 0, 39, 8, 21])
    noise = torch.randint(40, (6, 7), generator=torch.Generator().manual_seed(2))
    fix_noise(m, noise)
    x = batch()
    bank = m.bank.features.clone()
    out = m.training_step(x, 0, index)
    f = F.normalize(m.projector(m.backbone(x[0])), dim=1)
    # Z from the first batch: n times the mean of exp(v.f/tau) over its B x (1 + m) pairs
    idx = torch.cat([index[:, None], noise], dim=1)
    z = 40 * torch.exp(torch.einsum("bkd,bd->bk", bank[idx].double(), f.double()) / 0.07).mean()
    assert m.nce_z.item() == pytest.approx(z.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(reference_loss(f, bank, index, noise, 0.07, z.item()).item(), rel=1e-4)
    # Z is fixed after the first batch: a second batch uses it unchanged
    m.after_optimizer_step(0, 10)
    x2 = batch(seed=5)
    bank2 = m.bank.features.clone()
    out2 = m.training_step(x2, 1, index)
    assert m.nce_z.item() == pytest.approx(z.item(), rel=1e-5)
    f2 = F.normalize(m.projector(m.backbone(x2[0])), dim=1)
    assert out2.loss.item() == pytest.approx(reference_loss(f2, bank2, index, noise, 0.07, z.item()).item(), rel=1e-4)


def test_softmax_variant_is_the_exact_non_parametric_softmax_over_the_whole_bank() -> None:
    """loss = "softmax": -log exp(v_i.f/tau) / sum_j exp(v_j.f/tau) over all n entries (paper Eq. 2), per sample."""
    m = tiny(("method.loss", "softmax"))
    m.eval()
    index = torch.tensor([3, 17, 0, 39, 8, 21])
    x = batch()
    bank = m.bank.features.clone()
    out = m.training_step(x, 0, index)
    f = F.normalize(m.projector(m.backbone(x[0])), dim=1).double().detach()
    per_sample = []
    for b, i in enumerate(index.tolist()):
        sims = [math.exp(float(bank[j].double() @ f[b]) / 0.07) for j in range(40)]
        per_sample.append(-math.log(sims[i] / sum(sims)))
    assert out.loss.item() == pytest.approx(sum(per_sample) / len(per_sample), rel=1e-5)
    assert m.nce_z.item() == 0.0  # no Z in the exact softmax
    # one gradient step on f raises each sample's own probability; the bank is written only after the step
    f_var = f.detach().float().requires_grad_(True)
    logits = f_var @ bank.T / 0.07
    torch.nn.functional.cross_entropy(logits, index).backward()
    moved = F.normalize(f_var - 0.01 * f_var.grad, dim=1)
    assert ((moved @ bank.T).softmax(1)[range(6), index] > (f_var @ bank.T).softmax(1)[range(6), index]).all()
    assert torch.equal(m.bank.features, bank)
    m.after_optimizer_step(0, 10)
    expected = F.normalize(bank[index] * 0.5 + f.float() * 0.5, dim=1)
    torch.testing.assert_close(m.bank.features[index], expected, rtol=1e-5, atol=1e-6)


def test_gradient_reaches_the_encoder_and_never_the_bank() -> None:
    m = tiny()
    out = m.training_step(batch(), 0, torch.arange(6))
    out.loss.backward()
    assert all(p.grad is not None for p in m.backbone.parameters() if p.requires_grad)
    assert m.projector.weight.grad is not None and m.projector.weight.grad.abs().sum() > 0
    assert not m.bank.features.requires_grad
    names = {n for g in m.param_groups() for n in g["names"]}
    assert not any(n.startswith("bank") or n == "nce_z" for n in names)


def test_bank_update_step_by_step() -> None:
    m = tiny(("method.bank_momentum", 0.5))
    opt = build_optimizer(m.param_groups(), m.recipe.optim, 6)
    for step, index in enumerate([torch.tensor([1, 5, 9, 2, 30, 33]), torch.tensor([5, 6, 7, 8, 0, 39])]):
        before = m.bank.features.clone()
        out = m.training_step(batch(seed=step), step, index)
        f = m._pending[1].clone()  # the features of this step's forward
        assert torch.equal(m.bank.features, before)  # nothing written before the optimizer step
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        m.after_optimizer_step(step, 10)
        after = m.bank.features
        expected = F.normalize(0.5 * before[index] + 0.5 * f, dim=1)
        torch.testing.assert_close(after[index], expected)
        torch.testing.assert_close(after[index].norm(dim=1), torch.ones(6))
        others = torch.ones(40, dtype=torch.bool)
        others[index] = False
        assert torch.equal(after[others], before[others])


def test_bank_is_initialised_as_the_reference() -> None:
    torch.manual_seed(0)
    bank = MemoryBank(20000, 128).features
    bound = 1 / math.sqrt(128 / 3)
    assert bank.min() >= -bound and bank.max() <= bound
    assert bank.pow(2).sum(1).mean().item() == pytest.approx(1.0, abs=0.01)  # E|v|^2 = 1


def test_bank_and_z_travel_in_the_state_dict() -> None:
    m = tiny()
    m.training_step(batch(), 0, torch.arange(6))
    m.after_optimizer_step(0, 10)
    state = m.state_dict()
    assert {"bank.features", "nce_z"} <= set(state)
    clone = tiny()
    assert clone.nce_z.item() == 0.0
    clone.load_state_dict(state)
    assert torch.equal(clone.bank.features, m.bank.features) and clone.nce_z.item() == m.nce_z.item()
    z = clone.nce_z.item()
    clone.training_step(batch(seed=3), 1, torch.arange(6))
    assert clone.nce_z.item() == z  # a loaded Z is kept, not estimated again


def clustered_bank(n: int = 600, classes: int = 4, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    centres = torch.eye(dim)[:classes]
    return F.normalize(centres[labels] + 0.1 * torch.randn(n, dim, generator=g), dim=1), labels


def test_knn_monitor_on_separable_clusters_and_without_labels() -> None:
    bank, labels = clustered_bank()
    m = tiny(n=600, labels=labels)
    m.bank.features.copy_(bank)
    assert m.epoch_end(1)["bank_knn_top1"] == pytest.approx(1.0)
    # random labels on the same bank: near chance (1/4), so the monitor is not trivially 1
    m.labels = torch.randint(4, (600,), generator=torch.Generator().manual_seed(1))
    assert m.epoch_end(1)["bank_knn_top1"] < 0.4
    unlabeled = tiny(n=600, labels=None)
    assert unlabeled.epoch_end(1) == {}
    assert tiny(("method.monitor_samples", 0), n=600, labels=labels).epoch_end(1) == {}


def test_monitor_lands_in_metrics_jsonl_only_with_labels(tmp_path: Path) -> None:
    labeled = write_image_folder(tmp_path / "labeled", per_class=12, classes=3)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(sorted(labeled.rglob("*.png"))):
        shutil.copy(p, flat / f"{i:03d}.png")
    r = load_recipe("instdisc", [*TINY, *SMALL, ("train.batch_size", 12), ("train.checkpoint_every", 0)])
    for data, expected in [(labeled, True), (flat, False)]:
        pretrain(r, str(data), tmp_path / f"run-{data.name}")
        record = json.loads((tmp_path / f"run-{data.name}/metrics.jsonl").read_text().splitlines()[-1])
        assert ("bank_knn_top1" in record) is expected
        assert "instance_acc" in record


def test_interrupted_and_resumed_run_gives_identical_bank_and_weights(tmp_path: Path) -> None:
    data = str(write_image_folder(tmp_path / "data", per_class=16, classes=4))
    r = load_recipe("instdisc", [*TINY, *SMALL, ("train.epochs", 3), ("train.batch_size", 16)])
    full = pretrain(r, data, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        pretrain(r, data, tmp_path / "cut", reporter=Interrupt(at=3))
    resumed = pretrain(r, data, tmp_path / "cut", resume=True)
    a, b = read_checkpoint(full.checkpoint), read_checkpoint(resumed.checkpoint)
    assert a.meta["step"] == b.meta["step"] == 12
    model_a, model_b = a.section("model"), b.section("model")
    assert model_a.keys() == model_b.keys() and {"bank.features", "nce_z"} <= set(model_a)
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    assert a.meta["metrics"]["bank_knn_top1"] == b.meta["metrics"]["bank_knn_top1"]


def test_training_step_needs_bound_data_and_indices() -> None:
    torch.manual_seed(0)
    m = build_method(load_recipe("instdisc", [*TINY, *SMALL]))
    with pytest.raises(RecipeError, match="bind_data"):
        m.training_step(batch(), 0, torch.arange(6))
    m.bind_data(40, None)
    with pytest.raises(RecipeError, match="indices"):
        m.training_step(batch(), 0, None)


@pytest.mark.parametrize("name", ["instdisc", "instdisc-cifar"])
def test_recipes_load_and_build(name: str) -> None:
    r = load_recipe(name, [])
    assert r.method.projector == "linear" and r.method.proj_output_dim == 128 and r.num_views == 1
    assert (r.method.nce_k, r.method.bank_momentum) == (4096, 0.5)
    assert r.method.temperature == (0.07 if name == "instdisc" else 0.1)
    if name == "instdisc-cifar":
        assert r.backbone.small_stem and r.train.batch_size == 128 and r.views[0].hflip_prob == 0.0
    m = tiny()
    assert isinstance(m.projector, torch.nn.Linear) and m.bank.features.shape == (40, 16)


@pytest.mark.parametrize(
    ("key", "value"),
    [("method.nce_k", 0), ("method.bank_momentum", 1.5), ("method.temperature", 0.0), ("method.loss", "full")],
)
def test_bad_values_are_one_clear_error(key: str, value) -> None:
    with pytest.raises(RecipeError, match=key.split(".")[1]) as e:
        load_recipe("instdisc", [(key, value)])
    assert "\n" not in str(e.value).strip()


def test_needs_exactly_one_view() -> None:
    with pytest.raises(RecipeError, match="needs 1 views"):
        tiny(("views.0.count", 2))
