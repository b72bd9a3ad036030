"""Online monitors during pretraining (``ssl pretrain --val``): the detached linear classifier and kNN."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, tiny_method, write_image_folder
from ssl_cli.artifacts.checkpoint import read_checkpoint
from ssl_cli.config import load_recipe
from ssl_cli.errors import CheckpointError, DataError
from ssl_cli.eval.run import run_knn, setup
from ssl_cli.runtime import SilentReporter
from ssl_cli.train.monitors import OnlineMonitors
from ssl_cli.train.optim import build_optimizer, effective_lr, set_lr
from ssl_cli.train.pretrain import pretrain


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("mon")
    train = write_image_folder(root / "train", per_class=16, classes=2)
    val = write_image_folder(root / "val", per_class=8, classes=2, split="test")
    return str(train), str(val)


def recipe(*overrides):
    return load_recipe("simclr", [*TINY, ("train.batch_size", 8), *overrides])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_classifier_gradient_is_the_softmax_formula_and_the_backbone_gets_none_of_it() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    method = tiny_method("simclr")
    plain = tiny_method("simclr")
    method.attach_online_classifier(labels, 3, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    index = torch.tensor([7, 2, 5, 0])

    out = method(views, 0, index)
    (out.loss + out.monitor_loss).backward()
    plain(views, 0, index).loss.backward()

    # SimCLR encodes both views in one batch: the classifier sees 2 x 4 features, labels repeated view-major
    with torch.no_grad():
        feats = plain.backbone(torch.cat(views))  # same weights, same batch: the same BN statistics
    targets = labels[index].repeat(2)
    w, b = method.online_classifier.weight, method.online_classifier.bias
    p = torch.softmax(feats @ w.T + b, dim=1)
    residual = (p - F.one_hot(targets, 3).float()) / len(targets)
    torch.testing.assert_close(w.grad, residual.T @ feats, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.grad, residual.sum(0), rtol=1e-4, atol=1e-6)
    logits = (feats @ w.T + b).detach()
    assert out.metrics["online_loss"] == pytest.approx(float(F.cross_entropy(logits, targets)), rel=1e-4)
    assert float(out.metrics["online_top1"]) == pytest.approx(
        float(((feats @ w.T + b).argmax(1) == targets).float().mean())
    )
    # stop-gradient: every backbone / projector gradient is the method's alone
    theirs = dict(plain.named_parameters())
    for name, param in method.method_parameters():
        assert torch.equal(param.grad, theirs[name].grad), name


def test_the_backbone_trains_bit_identically_with_the_monitors_on(folders, tmp_path: Path) -> None:
    train, val = folders
    r = recipe(("monitor.knn.every", 0))
    with_monitors = pretrain(r, train, tmp_path / "on", val=val)
    without = pretrain(r, train, tmp_path / "off")
    a, b = (
        read_checkpoint(with_monitors.checkpoint).section("model"),
        read_checkpoint(without.checkpoint).section("model"),
    )
    assert set(a) - set(b) == {"online_classifier.weight", "online_classifier.bias"}
    assert all(torch.equal(a[k], b[k]) for k in b)  # the classifier's RNG, loss and group leave training alone
    init = torch.empty_like(a["online_classifier.weight"])
    bound = 1.0 / init.shape[1] ** 0.5
    init.uniform_(-bound, bound, generator=torch.Generator().manual_seed(r.train.seed))
    assert not torch.equal(a["online_classifier.weight"], init)  # ... and the classifier itself did train
    rec = records(tmp_path / "on")[-1]
    assert 0.0 <= rec["online_top1"] <= 1.0 and rec["online_loss"] > 0
    assert "knn_top1" not in rec  # knn.every = 0


def test_knn_every_and_the_last_epoch() -> None:
    m = OnlineMonitors.__new__(OnlineMonitors)
    m.recipe = recipe(("train.epochs", 5))
    m.config = recipe(("monitor.knn.every", 2)).monitor
    assert [e for e in range(1, 6) if m.due(e)] == [2, 4, 5]
    m.config = recipe(("monitor.knn.every", 0)).monitor
    assert not any(m.due(e) for e in range(1, 6))


def test_the_classifier_group_follows_the_schedule_at_online_lr_without_decay() -> None:
    r = recipe(("optim.name", "lars"), ("optim.lr", 0.3), ("optim.weight_decay", 1e-4), ("monitor.online_lr", 0.05))
    method = tiny_method("simclr", ("optim.name", "lars"))
    method.attach_online_classifier(torch.zeros(4, dtype=torch.long), 2, torch.Generator())
    monitors = OnlineMonitors.__new__(OnlineMonitors)
    monitors.online_lr = r.monitor.resolved_online_lr("lars")
    base = effective_lr(r.optim, 8)
    opt = build_optimizer(monitors.param_groups(method.param_groups(), method, base), r.optim, 8)
    group = opt.param_groups[-1]
    assert group["names"] == ["online_classifier.weight", "online_classifier.bias"]
    assert group["weight_decay"] == 0.0 and group["lars_adapt"] is False
    assert not any(n.startswith("online_classifier") for g in opt.param_groups[:-1] for n in g["names"])
    set_lr(opt, base / 2)  # half-way down the schedule
    assert group["lr"] == pytest.approx(0.025)
    assert r.monitor.resolved_online_lr("adamw") == 0.05
    assert recipe().monitor.resolved_online_lr("adamw") == 1e-3 and recipe().monitor.resolved_online_lr("sgd") == 0.1


def test_monitor_knn_is_ssl_knn_on_the_checkpoint(folders, tmp_path: Path) -> None:
    train, val = folders
    result = pretrain(recipe(("train.epochs", 2), ("monitor.knn.every", 1)), train, tmp_path / "run", val=val)
    recs = records(tmp_path / "run")
    assert [("knn_top1" in r, "online_val_top1" in r) for r in recs] == [(True, True), (True, True)]
    knn = run_knn(setup(result.checkpoint, train, val, "cpu"), [20], 0.07, 16, 0)
    assert recs[-1]["knn_top1"] == knn["top1"] and recs[-1]["knn_top5"] == knn["top5"]
    assert result.monitors["knn_top1"] == knn["top1"]
    meta = read_checkpoint(result.checkpoint).meta
    assert meta["data"]["val"] == val and meta["monitor"]["knn"]["k"] == 20


class Interrupt(SilentReporter):
    def epoch_end(self, record: dict) -> None:
        if record["epoch"] == 2:
            raise KeyboardInterrupt


def test_resume_keeps_the_monitors_and_matches_the_uninterrupted_run(folders, tmp_path: Path) -> None:
    train, val = folders
    r = recipe(("monitor.knn.every", 0), ("train.epochs", 2), ("train.batch_size", 4))
    full = read_checkpoint(pretrain(r, train, tmp_path / "full", val=val).checkpoint).section("model")
    with pytest.raises(KeyboardInterrupt):
        pretrain(r, train, tmp_path / "cut", val=val, reporter=Interrupt())
    with pytest.raises(CheckpointError, match="trained with the online classifier.*same --val"):
        pretrain(r, train, tmp_path / "cut", resume=True)
    resumed = read_checkpoint(pretrain(r, train, tmp_path / "cut", resume=True, val=val).checkpoint).section("model")
    assert "online_classifier.weight" in resumed
    assert all(torch.equal(full[k], resumed[k]) for k in full)  # classifier and its optimizer state included
    pretrain(r, train, tmp_path / "plain")
    with pytest.raises(CheckpointError, match="without the online classifier"):
        pretrain(r, train, tmp_path / "plain", resume=True, val=val)


def test_bad_held_out_data_is_one_line(folders, tmp_path: Path) -> None:
    train, _ = folders
    other = write_image_folder(tmp_path / "other", per_class=2, classes=3, split="test")
    unlabeled = tmp_path / "flat"
    unlabeled.mkdir()
    for src in sorted(Path(train).rglob("*.png"))[:10]:
        (unlabeled / f"{src.parent.name}_{src.name}").write_bytes(src.read_bytes())
    cases = [
        (train, str(other), "same class folders"),
        (train, str(unlabeled), "need labels"),
        (str(unlabeled), train, "labels for the training images too"),
    ]
    for data, val, message in cases:
        with pytest.raises(DataError, match=message) as e:
            pretrain(recipe(), data, tmp_path / "x", val=val)
        assert "\n" not in str(e.value)


def test_cli_val_logs_the_monitors_and_resume_reuses_it(folders, tmp_path: Path) -> None:
    from helpers import invoke, ok

    train, val = folders
    tiny = [a for k, v in TINY if k != "train.epochs" for a in ("--set", f"{k}={v}")]
    run = tmp_path / "run"
    base = ["pretrain", "--recipe", "simclr", "--data", train, "--batch-size", "8", "--epochs", "1", *tiny]
    result = ok(invoke(*base, "--out", run, "--val", val, "--json"))
    summary = json.loads(result.stdout)
    assert set(summary["monitors"]) == {"knn_top1", "knn_top5", "online_val_top1", "online_val_top5"}
    assert "monitors on" in result.stderr and "online_top1" in result.stderr
    # --resume without --val: the run's own held-out set comes from the checkpoint (nothing to train: 1 epoch done)
    again = ok(invoke("pretrain", "--out", run, "--resume", "--json"))
    assert json.loads(again.stdout)["epochs"] == 1
    bad = invoke(*base, "--out", tmp_path / "bad", "--val", tmp_path / "missing")
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1
