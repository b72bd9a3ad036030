"""Tests for the weighted kNN evaluation (ssl_cli.eval.knn)."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_cli.eval.knn import knn_classify


def gaussian_clusters(
    num_classes: int, dim: int, per_class: int, spread: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random class centres and ``per_class`` noisy samples around each; returns (centres, x, y)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return centres, features, labels


def brute_force_knn(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
) -> tuple[float, float]:
    """Reference: full cosine-similarity matrix, then plain Python votes per test sample."""
    train_unit = train_x.double() / train_x.double().norm(dim=1, keepdim=True)
    test_unit = test_x.double() / test_x.double().norm(dim=1, keepdim=True)
    similarity = (test_unit @ train_unit.T).tolist()
    top1 = top5 = 0
    for i, true_label in enumerate(test_y.tolist()):
        row = similarity[i]
        neighbours = sorted(range(len(row)), key=lambda j: -row[j])[: min(k, len(row))]
        votes = [0.0] * num_classes
        for j in neighbours:
            votes[int(train_y[j])] += math.exp(row[j] / temperature)
        # Most votes first; equal votes (e.g. classes nobody voted for) by class index.
        ranking = sorted(range(num_classes), key=lambda c: (-votes[c], c))
        top1 += ranking[0] == true_label
        top5 += true_label in ranking[:5]
    return top1 / len(test_y), top5 / len(test_y)


def test_separated_clusters_are_classified_perfectly() -> None:
    centres, train_x, train_y = gaussian_clusters(10, 32, 40, spread=0.1, seed=0)
    g = torch.Generator().manual_seed(1)
    test_y = torch.arange(10).repeat_interleave(10)
    test_x = centres[test_y] + 0.1 * torch.randn(len(test_y), 32, generator=g)

    result = knn_classify(train_x, train_y, test_x, test_y, num_classes=10, ks=(1, 10, 20, 200))

    for k, (top1, top5) in result.items():
        assert top1 >= 0.99, k
        assert top5 == 1.0, k


def test_random_labels_are_near_chance() -> None:
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(2000, 32, generator=g), torch.randn(1000, 32, generator=g)
    train_y, test_y = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (1000,), generator=g)

    (top1, top5) = knn_classify(train_x, train_y, test_x, test_y, num_classes=10, ks=(20,))[20]

    assert abs(top1 - 0.1) < 0.04
    assert abs(top5 - 0.5) < 0.08


@pytest.mark.parametrize("chunk_size", [1, 8, 10_000])
def test_matches_brute_force_for_several_k(chunk_size: int) -> None:
    g = torch.Generator().manual_seed(3)
    num_classes, temperature, ks = 7, 0.1, (1, 3, 10, 25)
    train_x, test_x = torch.randn(300, 16, generator=g), torch.randn(45, 16, generator=g)
    # Make the labels learnable-ish so the votes are not all noise.
    train_y = (train_x[:, 0] * 2).round().clamp(-3, 3).long() + 3
    test_y = torch.randint(0, num_classes, (45,), generator=g)

    result = knn_classify(
        train_x, train_y, test_x, test_y, num_classes, ks=ks, temperature=temperature, chunk_size=chunk_size
    )

    expected = {k: brute_force_knn(train_x, train_y, test_x, test_y, num_classes, k, temperature) for k in ks}
    assert result == expected


def weighting_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One very close class-0 neighbour against two farther class-1 neighbours (cosine 1 vs 0.5)."""
    angle = math.radians(60)
    train_x = torch.tensor([[1.0, 0.0], [math.cos(angle), math.sin(angle)], [math.cos(angle), -math.sin(angle)]])
    train_y = torch.tensor([0, 1, 1])
    test_x, test_y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    return train_x, train_y, test_x, test_y


def test_votes_are_weighted_by_exp_similarity_over_temperature() -> None:
    train_x, train_y, test_x, test_y = weighting_case()
    # An unweighted majority of the 3 neighbours would say class 1 (two votes against one).
    assert torch.bincount(train_y).argmax() == 1

    # T = 0.07: exp(1 / 0.07) ~ 1.6e6 beats 2 * exp(0.5 / 0.07) ~ 2.5e3 -> class 0, correct.
    weighted = knn_classify(train_x, train_y, test_x, test_y, num_classes=2, ks=(3,), temperature=0.07)
    assert weighted[3] == (1.0, 1.0)
    # T = 100 makes the weights nearly equal, so the vote degrades to the (wrong) majority.
    flat = knn_classify(train_x, train_y, test_x, test_y, num_classes=2, ks=(3,), temperature=100.0)
    assert flat[3] == (0.0, 1.0)


def test_similarity_is_cosine_not_dot_product() -> None:
    train_x, train_y, test_x, test_y = weighting_case()
    scaled = train_x.clone()
    scaled[1:] *= 100  # with a dot product, the class-1 points would now have similarity 50 vs 1
    for k in (1, 3):
        assert knn_classify(scaled, train_y, test_x * 0.01, test_y, 2, ks=(k,))[k] == (1.0, 1.0)

    # Same on random data: rescaling rows changes nothing.
    g = torch.Generator().manual_seed(5)
    train_x, test_x = torch.randn(200, 8, generator=g), torch.randn(50, 8, generator=g)
    train_y, test_y = torch.randint(0, 6, (200,), generator=g), torch.randint(0, 6, (50,), generator=g)
    scales = torch.where(torch.arange(200) % 2 == 0, 100.0, 1.0)[:, None]
    ks = (1, 5, 20)
    plain = knn_classify(train_x, train_y, test_x, test_y, 6, ks=ks)
    assert knn_classify(train_x * scales, train_y, test_x * 3, test_y, 6, ks=ks) == plain


def test_top5_counts_the_five_best_classes() -> None:
    # One train point per class at angles 0, 10, ..., 60 degrees: seen from angle 0, class c is the
    # (c+1)-th most similar, so the vote ranking is 0, 1, 2, 3, 4, 5, 6.
    angles = [math.radians(10 * c) for c in range(7)]
    train_x = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
    train_y = torch.arange(7)
    test_x = torch.tensor([[1.0, 0.0]] * 3)
    test_y = torch.tensor([0, 4, 5])  # rank 1 (top-1), rank 5 (top-5 only), rank 6 (neither)

    result = knn_classify(train_x, train_y, test_x, test_y, num_classes=7, ks=(7, 100))

    # k = 100 > 7 train samples is clamped and gives the same answer as using all of them.
    assert result == {7: (1 / 3, 2 / 3), 100: (1 / 3, 2 / 3)}


def test_top5_with_fewer_than_five_classes_is_one() -> None:
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(50, 4, generator=g), torch.randn(20, 4, generator=g)
    train_y, test_y = torch.randint(0, 3, (50,), generator=g), torch.randint(0, 3, (20,), generator=g)

    result = knn_classify(train_x, train_y, test_x, test_y, num_classes=3, ks=(1, 10))

    assert all(top5 == 1.0 for _, top5 in result.values())
    assert all(top1 < 1.0 for top1, _ in result.values())  # random labels: top-1 is not trivially 1


def test_k_larger_than_train_set_uses_all_train_samples() -> None:
    g = torch.Generator().manual_seed(2)
    train_x, test_x = torch.randn(6, 5, generator=g), torch.randn(30, 5, generator=g)
    train_y, test_y = torch.tensor([0, 0, 1, 1, 2, 2]), torch.randint(0, 3, (30,), generator=g)

    result = knn_classify(train_x, train_y, test_x, test_y, num_classes=3, ks=(6, 50), temperature=0.2)

    assert result[50] == result[6] == brute_force_knn(train_x, train_y, test_x, test_y, 3, 6, 0.2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train_labels": torch.zeros(9, dtype=torch.long)}, "different lengths"),
        ({"test_labels": torch.zeros(4, dtype=torch.long)}, "different lengths"),
        ({"train_features": torch.randn(0, 3), "train_labels": torch.zeros(0, dtype=torch.long)}, "empty"),
        ({"test_features": torch.randn(5, 4)}, "dimensions"),
        ({"ks": (5, 0)}, "k must be >= 1"),
        ({"ks": ()}, "at least one k"),
        ({"train_labels": torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])}, r"\[0, 3\)"),
        ({"test_labels": torch.tensor([0, -1, 0, 1, 2])}, r"\[0, 3\)"),
        ({"temperature": 0.0}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_invalid_inputs_raise_value_error(change: dict, message: str) -> None:
    args = {
        "train_features": torch.randn(10, 3),
        "train_labels": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]),
        "test_features": torch.randn(5, 3),
        "test_labels": torch.tensor([0, 1, 2, 0, 1]),
        "num_classes": 3,
        "ks": (1, 3),
    }
    args.update(change)
    with pytest.raises(ValueError, match=message):
        knn_classify(**args)


# --- chunking over the train bank, deterministic ties, float16 bank ------------------------------------------------


def exact_sign_vectors(n: int, dim: int, seed: int) -> torch.Tensor:
    """Rows with exactly four entries of +-1: unit rows hold +-0.5, so every cosine is a multiple of 1/4, computed
    exactly in any summation order -- and ties between neighbours are everywhere."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, dim)
    for i in range(n):
        cols = torch.randperm(dim, generator=g)[:4]
        x[i, cols] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    return x


def brute_force_neighbours(train_x: torch.Tensor, test_x: torch.Tensor, k: int) -> list[list[int]]:
    """Reference: every similarity in float64, then a Python sort by (similarity descending, train index)."""
    sim = (test_x.double() / test_x.double().norm(dim=1, keepdim=True)) @ (
        train_x.double() / train_x.double().norm(dim=1, keepdim=True)
    ).T
    return [sorted(range(sim.shape[1]), key=lambda j: (-sim[i, j].item(), j))[:k] for i in range(sim.shape[0])]


@pytest.mark.parametrize("train_chunk", [1, 3, 16, 50, 10_000])
def test_chunked_neighbours_equal_brute_force_including_ties(train_chunk: int) -> None:
    from ssl_cli.eval.knn import nearest_neighbors, normalized_bank

    train_x, test_x = exact_sign_vectors(120, 8, seed=0), exact_sign_vectors(20, 8, seed=1)
    bank = normalized_bank(train_x, chunk_size=7)
    queries = torch.nn.functional.normalize(test_x, dim=1)
    sims, index = nearest_neighbors(queries, bank, 30, train_chunk_size=train_chunk)

    assert index.tolist() == brute_force_neighbours(train_x, test_x, 30)
    assert torch.equal(sims, (queries @ bank.T).gather(1, index))
    assert (sims[:, :-1] == sims[:, 1:]).sum() > 100  # the case is full of ties


def test_knn_results_do_not_depend_on_either_chunk_size() -> None:
    g = torch.Generator().manual_seed(4)
    train_x, test_x = exact_sign_vectors(150, 8, seed=2), exact_sign_vectors(40, 8, seed=3)
    train_y, test_y = torch.randint(0, 5, (150,), generator=g), torch.randint(0, 5, (40,), generator=g)
    reference = knn_classify(train_x, train_y, test_x, test_y, 5, ks=(1, 7, 40), chunk_size=10_000)
    for chunk, train_chunk in [(1, 1), (3, 7), (16, 50), (40, 149), (7, 10_000)]:
        got = knn_classify(
            train_x, train_y, test_x, test_y, 5, ks=(1, 7, 40), chunk_size=chunk, train_chunk_size=train_chunk
        )
        assert got == reference, (chunk, train_chunk)


@pytest.mark.parametrize("train_chunk", [7, 64, 10_000])
def test_bank_chunks_match_brute_force_accuracy_on_random_data(train_chunk: int) -> None:
    g = torch.Generator().manual_seed(3)
    train_x, test_x = torch.randn(300, 16, generator=g), torch.randn(45, 16, generator=g)
    train_y = (train_x[:, 0] * 2).round().clamp(-3, 3).long() + 3
    test_y = torch.randint(0, 7, (45,), generator=g)
    result = knn_classify(
        train_x, train_y, test_x, test_y, 7, ks=(1, 10, 25), temperature=0.1, train_chunk_size=train_chunk
    )
    assert result == {k: brute_force_knn(train_x, train_y, test_x, test_y, 7, k, 0.1) for k in (1, 10, 25)}


def test_similarity_blocks_stay_within_both_chunk_sizes(monkeypatch) -> None:
    import ssl_cli.eval.knn as knn_module

    shapes: list[tuple[int, int]] = []
    original = knn_module._block_topk

    def recording(similarity, k):
        shapes.append(tuple(similarity.shape))
        return original(similarity, k)

    monkeypatch.setattr(knn_module, "_block_topk", recording)
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(1000, 8, generator=g), torch.randn(50, 8, generator=g)
    train_y, test_y = torch.randint(0, 3, (1000,), generator=g), torch.randint(0, 3, (50,), generator=g)
    knn_classify(train_x, train_y, test_x, test_y, 3, ks=(20,), chunk_size=16, train_chunk_size=128)
    assert max(r for r, _ in shapes) == 16 and max(c for _, c in shapes) == 128
    assert len(shapes) == 4 * 8  # ceil(50 / 16) test chunks x ceil(1000 / 128) bank chunks


def test_float16_bank_halves_memory_and_keeps_the_figures() -> None:
    from ssl_cli.eval.knn import bank_dtype_for, normalized_bank

    centres, train_x, train_y = gaussian_clusters(10, 64, 100, spread=1.0, seed=0)
    g = torch.Generator().manual_seed(1)
    test_y = torch.arange(10).repeat_interleave(20)
    test_x = centres[test_y] + 1.0 * torch.randn(len(test_y), 64, generator=g)

    half = normalized_bank(train_x, torch.float16)
    assert half.dtype == torch.float16 and half.element_size() * half.nelement() == train_x.nelement() * 2
    full = knn_classify(train_x, train_y, test_x, test_y, 10, ks=(1, 20))
    approx = knn_classify(
        train_x, train_y, test_x, test_y, 10, ks=(1, 20), bank_dtype=torch.float16, train_chunk_size=100
    )
    for k in (1, 20):
        assert abs(full[k][0] - approx[k][0]) <= 0.01 and abs(full[k][1] - approx[k][1]) <= 0.01

    assert bank_dtype_for((50_000, 512)) == torch.float32  # 100 MB: unchanged
    assert bank_dtype_for((1_000_000, 512)) == torch.float16  # 2 GB in float32
    assert bank_dtype_for((1_000_000, 512), "float32") == torch.float32
    with pytest.raises(ValueError, match="auto"):
        bank_dtype_for((10, 10), "int8")
