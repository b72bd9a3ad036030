"""Tests for the linear probe and top-k accuracy (ssl_cli.eval.linear)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ssl_cli.eval.linear import ProbeResult, topk_accuracy, train_linear_probe


def clusters(centres: torch.Tensor, per_class: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` Gaussian samples around each row of ``centres``; returns (features, labels)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(centres)).repeat_interleave(per_class)
    return centres[labels] + spread * torch.randn(len(labels), centres.shape[1], generator=g), labels


def train_test_clusters(spread: float, num_classes: int = 4, dim: int = 16, per_class: int = 100):
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0))
    return (*clusters(centres, per_class, spread, seed=1), *clusters(centres, per_class, spread, seed=2))


def run_probe(train_x, train_y, test_x, test_y, num_classes, **kwargs) -> tuple[ProbeResult, list[float]]:
    """Train a probe, recording the per-epoch losses reported through ``progress``."""
    losses: list[float] = []
    epochs_seen: list[int] = []

    def progress(epoch: int, loss: float) -> None:
        epochs_seen.append(epoch)
        losses.append(loss)

    kwargs.setdefault("epochs", 10)
    kwargs.setdefault("batch_size", 64)
    result = train_linear_probe(train_x, train_y, test_x, test_y, num_classes, progress=progress, **kwargs)
    assert epochs_seen == list(range(1, kwargs["epochs"] + 1))  # once per epoch, counting from 1
    return result, losses


def test_linearly_separable_data_is_learned_perfectly() -> None:
    result, losses = run_probe(*train_test_clusters(spread=0.3), num_classes=4, epochs=20)

    assert result.top1 == 1.0
    assert result.train_top1 == 1.0
    assert result.top5 == 1.0
    assert losses[-1] < losses[0] / 5  # the loss actually went down
    assert (result.epochs, result.lr, result.weight_decay) == (20, 0.1, 0.0)


def test_overlapping_data_beats_chance_but_is_not_perfect() -> None:
    result, _ = run_probe(*train_test_clusters(spread=2.0), num_classes=4, epochs=20)

    assert 0.5 < result.top1 < 0.9  # chance is 0.25
    assert result.top5 == 1.0  # only 4 classes


def test_same_seed_gives_identical_results_and_other_seed_differs() -> None:
    data = train_test_clusters(spread=1.5)

    first, first_losses = run_probe(*data, num_classes=4, seed=7)
    again, again_losses = run_probe(*data, num_classes=4, seed=7)
    other, other_losses = run_probe(*data, num_classes=4, seed=8)

    assert first == again
    assert first_losses == again_losses
    assert other_losses != first_losses  # the seed drives init and shuffling


def test_global_rng_is_left_alone() -> None:
    data = train_test_clusters(spread=1.0, per_class=10)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_linear_probe(*data, 4, epochs=2)
    assert torch.equal(torch.rand(3), expected)


def test_normalize_standardises_with_train_statistics() -> None:
    train_x, train_y, test_x, test_y = train_test_clusters(spread=1.0)
    # Give every dimension its own offset and scale, and shift the test set so that its own statistics
    # differ from the train statistics.
    g = torch.Generator().manual_seed(4)
    scale, offset = torch.rand(16, generator=g) * 10 + 0.1, torch.randn(16, generator=g) * 50
    raw_train, raw_test = train_x * scale + offset, (test_x + 0.5) * scale + offset

    normalized, normalized_losses = run_probe(raw_train, train_y, raw_test, test_y, 4, normalize=True)

    mean, std = raw_train.mean(dim=0), raw_train.std(dim=0, unbiased=False)
    manual, manual_losses = run_probe(
        (raw_train - mean) / std, train_y, (raw_test - mean) / std, test_y, 4, normalize=False
    )
    assert normalized_losses == pytest.approx(manual_losses, rel=1e-4)
    assert (normalized.top1, normalized.top5, normalized.train_top1) == (
        manual.top1,
        manual.top5,
        manual.train_top1,
    )


def test_normalize_does_not_use_test_statistics() -> None:
    # Two classes separated only by the sign of dimension 0.
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(2).repeat(200)
    signal = torch.zeros(400, 8)
    signal[:, 0] = labels * 2.0 - 1.0
    train_x = signal + 0.3 * torch.randn(400, 8, generator=g)
    test_x = signal + 0.3 * torch.randn(400, 8, generator=g)

    aligned, _ = run_probe(train_x, labels, test_x, labels, 2)
    assert aligned.top1 > 0.95

    # Shift every test sample far along dimension 0. Standardising the test set with its own
    # statistics would undo the shift and still score ~1.0; with the train statistics the shifted
    # samples all land on the positive side and only one class is predicted.
    shifted = test_x.clone()
    shifted[:, 0] += 3.0
    moved, _ = run_probe(train_x, labels, shifted, labels, 2)
    assert moved.top1 < 0.6
    assert moved.train_top1 > 0.95


def test_learning_rate_is_scaled_by_batch_size_over_256() -> None:
    # 200 samples: batch sizes 256 and 512 are both full-batch gradient descent on the same data
    # order, so only the effective learning rate lr * batch_size / 256 can tell them apart.
    data = train_test_clusters(spread=1.5, per_class=50)

    _, small_batch = run_probe(*data, num_classes=4, batch_size=256, lr=0.4)
    _, large_batch_same_effective = run_probe(*data, num_classes=4, batch_size=512, lr=0.2)
    _, large_batch_same_base = run_probe(*data, num_classes=4, batch_size=512, lr=0.4)

    assert large_batch_same_effective == pytest.approx(small_batch, rel=1e-5)
    assert large_batch_same_base != pytest.approx(small_batch, rel=1e-3)


def test_sgd_uses_momentum_weight_decay_and_per_step_cosine_decay(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict] = []
    original_step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        seen.append(dict(self.param_groups[0]))  # the hyper-parameters this step is taken with
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    data = train_test_clusters(spread=1.0, per_class=50)  # 200 samples / batch 64 -> 4 steps per epoch
    result, _ = run_probe(*data, num_classes=4, epochs=3, batch_size=64, lr=0.8, weight_decay=1e-3, momentum=0.5)

    total = 3 * 4
    peak = 0.8 * 64 / 256
    expected = [peak * 0.5 * (1 + math.cos(math.pi * step / total)) for step in range(total)]
    assert [group["lr"] for group in seen] == pytest.approx(expected, rel=1e-6)
    assert all(group["momentum"] == 0.5 and group["weight_decay"] == 1e-3 for group in seen)
    assert (result.lr, result.weight_decay) == (0.8, 1e-3)  # reported as passed in, before scaling


def test_probe_result_fields() -> None:
    assert [f.name for f in dataclasses.fields(ProbeResult)] == [
        "top1",
        "top5",
        "train_top1",
        "epochs",
        "lr",
        "weight_decay",
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train_labels": torch.zeros(7, dtype=torch.long)}, "different lengths"),
        ({"test_labels": torch.tensor([0, 1, 5, 0, 1])}, r"\[0, 3\)"),
        ({"test_features": torch.randn(5, 2)}, "dimensions"),
        ({"train_features": torch.randn(0, 4), "train_labels": torch.zeros(0, dtype=torch.long)}, "empty"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_invalid_inputs_raise_value_error(change: dict, message: str) -> None:
    args = {
        "train_features": torch.randn(6, 4),
        "train_labels": torch.tensor([0, 1, 2, 0, 1, 2]),
        "test_features": torch.randn(5, 4),
        "test_labels": torch.tensor([0, 1, 2, 0, 1]),
        "num_classes": 3,
        "epochs": 1,
    }
    args.update(change)
    with pytest.raises(ValueError, match=message):
        train_linear_probe(**args)


def test_topk_accuracy_on_hand_computed_logits() -> None:
    logits = torch.tensor(
        [
            [0.1, 0.5, 0.2, 0.0, 0.9, 0.3, 0.4],  # ranking 4 1 6 5 2 0 3, label 4: rank 1
            [3.0, 1.0, 2.0, 0.0, -1.0, -2.0, -3.0],  # ranking 0 2 1 3 4 5 6, label 4: rank 5
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # ranking 6 5 4 3 2 1 0, label 1: rank 6
            [5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0],  # ranking 0 1 2 3 4 5 6, label 1: rank 2
        ]
    )
    labels = torch.tensor([4, 4, 1, 1])

    assert topk_accuracy(logits, labels) == (0.25, 0.75)
    assert topk_accuracy(logits, labels, ks=(1, 2, 5, 6, 7)) == (0.25, 0.5, 0.75, 1.0, 1.0)


def test_topk_accuracy_clamps_k_and_breaks_ties_by_class_index() -> None:
    logits = torch.tensor([[0.2, 0.5, 0.1], [0.9, 0.0, 0.3]])
    assert topk_accuracy(logits, torch.tensor([2, 2]), ks=(1, 5, 100)) == (0.0, 1.0, 1.0)

    # All scores equal: the lower class index wins, so the result does not depend on sort internals.
    tied = torch.zeros(2, 5)
    assert topk_accuracy(tied, torch.tensor([0, 3]), ks=(1, 3, 4)) == (0.5, 0.5, 1.0)


# --- the one-pass sweep (ssl_cli.eval.sweep) ------------------------------------------------------------------------


def reference_head(train_x, train_y, num_classes, *, epochs, lr, weight_decay, batch_size, seed) -> torch.nn.Linear:
    """The single-pair probe as it was written before the sweep existed (standardise, one nn.Linear, SGD +
    momentum, per-step cosine), returning its head: what each head of the sweep must equal."""
    mean, std = train_x.mean(dim=0), (train_x.var(dim=0, unbiased=False) + 1e-6).sqrt()
    x = (train_x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.utils.skip_init(torch.nn.Linear, x.shape[1], num_classes)
    with torch.no_grad():
        torch.nn.init.trunc_normal_(head.weight, std=0.01, generator=generator)
        torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr * batch_size / 256, momentum=0.9, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(x) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = torch.nn.functional.cross_entropy(head(x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return head


def test_every_sweep_head_equals_its_own_single_pair_run() -> None:
    from ssl_cli.eval.sweep import holdout_split, sweep_linear_probe

    train_x, train_y, test_x, test_y = train_test_clusters(spread=1.5, per_class=60)
    lrs, wds = (0.05, 0.5, 5.0), (0.0, 1e-2)
    result = sweep_linear_probe(
        train_x, train_y, test_x, test_y, 4, lrs=lrs, weight_decays=wds, epochs=4, batch_size=32, seed=3
    )
    fit, held = holdout_split(train_y, 0.1, seed=3)
    assert (result.train_size, result.holdout_size) == (216, 24) and result.holdout_fraction == 0.1

    pairs = [(lr, wd) for lr in lrs for wd in wds]
    assert [(h.lr, h.weight_decay) for h in result.heads] == pairs
    for p, (lr, wd) in enumerate(pairs):
        head = reference_head(train_x[fit], train_y[fit], 4, epochs=4, lr=lr, weight_decay=wd, batch_size=32, seed=3)
        assert torch.equal(result.weights[p], head.weight.detach()), (lr, wd)
        assert torch.equal(result.biases[p], head.bias.detach()), (lr, wd)
        # and train_linear_probe with that pair alone, on the same train part, agrees on what it reports
        alone = train_linear_probe(
            train_x[fit], train_y[fit], test_x, test_y, 4, epochs=4, lr=lr, weight_decay=wd, batch_size=32, seed=3
        )
        assert alone.train_top1 == result.heads[p].train_top1
        if p == result.best:
            assert (alone.top1, alone.top5) == (result.top1, result.top5)
    assert len({tuple(w.flatten()[:3].tolist()) for w in result.weights}) == len(pairs)  # the pairs do differ
    assert held.numel() == 24


def test_sweep_learns_separable_features_perfectly() -> None:
    from ssl_cli.eval.sweep import sweep_linear_probe

    result = sweep_linear_probe(
        *train_test_clusters(spread=0.3), 4, lrs=(0.1, 1.0), weight_decays=(0.0, 1e-4), epochs=10, batch_size=64
    )
    assert result.top1 == 1.0 and result.train_top1 == 1.0
    assert all(h.holdout_top1 == 1.0 for h in result.heads)


def test_best_pair_is_chosen_on_the_holdout_not_on_val() -> None:
    from ssl_cli.eval.sweep import sweep_linear_probe

    train_x, train_y, test_x, test_y = train_test_clusters(spread=0.5, per_class=50)
    lrs = (1e-6, 1.0)  # 1e-6: the head hardly moves from its random init; 1.0: learns the clusters

    def sweep(val_labels):
        # seed 1: seed 0 would draw the init from the stream that drew the cluster centres (it then classifies them)
        return sweep_linear_probe(train_x, train_y, test_x, val_labels, 4, lrs=lrs, epochs=5, batch_size=32, seed=1)

    def val_top1(result, val_labels) -> list[float]:
        x = (test_x - result.mean) / result.std
        return [
            topk_accuracy(x @ w.T + b, val_labels, (1,))[0] for w, b in zip(result.weights, result.biases, strict=True)
        ]

    honest = sweep(test_y)
    # A val set labelled by what the untrained head predicts: on it that head is perfect and the trained one not.
    x = (test_x - honest.mean) / honest.std
    adversarial = (x @ honest.weights[0].T + honest.biases[0]).argmax(dim=1)
    result = sweep(adversarial)

    on_val = val_top1(result, adversarial)
    assert on_val[0] == 1.0 > on_val[1]  # choosing on val would pick the untrained head ...
    assert result.heads[1].holdout_top1 > result.heads[0].holdout_top1  # ... the holdout picks the trained one
    assert result.best == honest.best == 1 and result.lr == 1.0
    assert torch.equal(result.weights, honest.weights)  # val plays no part in training or choosing
    assert result.top1 == on_val[1]  # and the chosen head's val figure is what is reported
    assert honest.top1 == 1.0


def test_holdout_split_is_class_balanced_and_reproducible() -> None:
    from ssl_cli.eval.sweep import holdout_split

    labels = torch.tensor([0] * 40 + [1] * 25 + [2] * 7 + [3] * 1)[
        torch.randperm(73, generator=torch.Generator().manual_seed(0))
    ]
    fit, held = holdout_split(labels, 0.2, seed=5)
    assert sorted(fit.tolist() + held.tolist()) == list(range(73))
    assert torch.bincount(labels[held], minlength=4).tolist() == [8, 5, 1, 0]  # round(0.2 n_c); a lone sample stays
    assert torch.equal(holdout_split(labels, 0.2, seed=5)[1], held)
    assert not torch.equal(holdout_split(labels, 0.2, seed=6)[1], held)
    assert holdout_split(labels, 0.0)[1].numel() == 0


def test_sweep_needs_a_holdout_for_several_pairs() -> None:
    from ssl_cli.eval.sweep import sweep_linear_probe

    data = train_test_clusters(spread=1.0, per_class=10)
    with pytest.raises(ValueError, match="holdout fraction > 0"):
        sweep_linear_probe(*data, 4, lrs=(0.1, 1.0), holdout_fraction=0.0, epochs=1)
    with pytest.raises(ValueError, match="holds out none"):
        sweep_linear_probe(*data, 4, lrs=(0.1, 1.0), holdout_fraction=0.01, epochs=1)
    # one pair, no holdout: exactly train_linear_probe
    from ssl_cli.eval.sweep import sweep_linear_probe as sweep

    one = sweep(*data, 4, lrs=(0.3,), weight_decays=(1e-3,), epochs=3, batch_size=16, seed=2)
    alone = train_linear_probe(*data, 4, lr=0.3, weight_decay=1e-3, epochs=3, batch_size=16, seed=2)
    assert (one.top1, one.top5, one.train_top1, one.holdout_size) == (alone.top1, alone.top5, alone.train_top1, 0)


def test_nan_scores_are_never_counted_correct() -> None:
    logits = torch.tensor([[float("nan"), 0.0, 1.0], [0.0, 2.0, 1.0]])
    assert topk_accuracy(logits, torch.tensor([0, 1]), (1, 5)) == (0.5, 0.5)
