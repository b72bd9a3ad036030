"""DeepCluster v2: spherical k-means against a direct Lloyd iteration, the loss against explicit loops, prototypes set
by k-means only, the feature memory step by step, its one-time fill (also across a resume), identical clusters
across instances, multi-crop, bench, recipes, bad values, and a short training run that beats a random encoder."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ssl_cli.losses.deepclusterv2 as dc2
from conftest import TINY, assert_one_line_error, tiny_method, write_image_folder
from ssl_cli.config import load_recipe
from ssl_cli.data.loader import mix_seed
from ssl_cli.errors import RecipeError
from ssl_cli.losses.deepclusterv2 import NO_CLUSTER, cluster_prediction, spherical_kmeans
from ssl_cli.train.launch import demo_overrides
from ssl_cli.train.optim import build_optimizer

SMALL = [
    ("backbone.small_stem", False),
    ("method.proj_hidden_dim", 32),
    ("method.proj_output_dim", 16),
    ("method.num_prototypes", [4, 3, 5]),  # 3 heads: views 0, 1, 0
]
N_IMAGES = 48  # the memory's size; the batches below show images 0..39 only


def tiny(*extra):
    return tiny_method("deepclusterv2-cifar", *SMALL, *extra)


def unit_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def epoch_batches(num_views: int = 2, batch: int = 8, seed: int = 0) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """5 batches of random views of images 0..39 in a shuffled order (images 40..47 never appear)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(40, generator=g)
    return [
        ([torch.randn(batch, 3, 32, 32, generator=g) for _ in range(num_views)], order[i : i + batch])
        for i in range(0, 40, batch)
    ]


def started(m, epoch: int = 0, data=None):
    """``m`` bound to N_IMAGES images, its epoch hook run on ``data`` (default: epoch_batches())."""
    m.bind_data(N_IMAGES, None)
    data = epoch_batches() if data is None else data
    m.epoch_start(epoch, lambda: iter(data))
    return m


# --- k-means ----------------------------------------------------------------------------------------------


def direct_kmeans(x: torch.Tensor, first: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's spherical k-means written out row by row in float64, from the centroids x[first]."""
    x = x.double()
    c = x[first].clone()
    for it in range(iterations + 1):
        a = torch.tensor([max(range(len(c)), key=lambda j, r=r: float(r @ c[j])) for r in x])
        if it == iterations:
            return c, a
        for j in range(len(c)):
            members = x[a == j]
            if len(members):  # an empty cluster keeps its centroid
                mean = members.mean(dim=0)
                c[j] = mean / mean.norm()
    raise AssertionError


@pytest.mark.parametrize("iterations", [0, 1, 3, 10])
def test_kmeans_against_a_direct_lloyd_iteration(iterations: int) -> None:
    x = unit_rows(60, 8, seed=1)
    first = torch.randperm(60, generator=torch.Generator().manual_seed(3))[:5]  # the documented initialisation
    centroids, assignments = spherical_kmeans(x, 5, iterations, torch.Generator().manual_seed(3))
    expected_c, expected_a = direct_kmeans(x, first, iterations)
    assert torch.equal(assignments, expected_a)
    torch.testing.assert_close(centroids.double(), expected_c, rtol=1e-5, atol=1e-6)


def test_kmeans_converged_output_is_a_fixed_point_and_the_objective_never_drops() -> None:
    x = unit_rows(200, 6, seed=2)
    centroids, assignments = spherical_kmeans(x, 7, 100, torch.Generator().manual_seed(0))
    # assignments: the argmax cosine to the returned centroids; centroids: unit, the normalised mean of members
    assert torch.equal(assignments, (x @ centroids.T).argmax(dim=1))
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(7))
    for j in range(7):
        members = x[assignments == j]
        assert len(members) > 0
        torch.testing.assert_close(centroids[j], F.normalize(members.mean(dim=0), dim=0), rtol=1e-5, atol=1e-6)
    objective = []
    for it in range(6):  # sum of each row's cosine to its centroid: Lloyd's iterations never lower it
        c, a = spherical_kmeans(x, 7, it, torch.Generator().manual_seed(0))
        objective.append(float((x * c[a]).sum()))
    assert all(b >= a - 1e-4 for a, b in zip(objective, objective[1:], strict=False))
    assert objective[-1] > objective[0]


def test_kmeans_recovers_well_separated_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    directions = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    truth = torch.arange(4).repeat_interleave(25)
    x = F.normalize(directions[truth] + 0.05 * torch.randn(100, 16, generator=g), dim=1)
    checked = 0
    for seed in range(40):
        first = torch.randperm(100, generator=torch.Generator().manual_seed(seed))[:4]
        if len(set(truth[first].tolist())) < 4:
            continue  # an initialisation with two centroids in one cluster may end in a local optimum
        _, a = spherical_kmeans(x, 4, 10, torch.Generator().manual_seed(seed))
        # the same partition up to the clusters' numbering: one found cluster per true cluster, and vice versa
        pairs = set(zip(truth.tolist(), a.tolist(), strict=True))
        assert len(pairs) == 4 and len({p[1] for p in pairs}) == 4
        checked += 1
    assert checked >= 2


def test_kmeans_in_slices_equals_one_pass_and_handles_more_clusters_than_rows(monkeypatch) -> None:
    x = unit_rows(50, 8, seed=4)
    whole = spherical_kmeans(x, 6, 5, torch.Generator().manual_seed(1))
    monkeypatch.setattr(dc2, "_CHUNK_ELEMENTS", 20)  # 3 rows per slice
    sliced = spherical_kmeans(x, 6, 5, torch.Generator().manual_seed(1))
    assert torch.equal(whole[1], sliced[1])
    torch.testing.assert_close(whole[0], sliced[0])
    # 3 rows, 5 clusters (ssl bench on tiny data): every row its own cluster, no error
    c, a = spherical_kmeans(x[:3], 5, 10, torch.Generator().manual_seed(0))
    assert c.shape == (5, 8) and sorted(a.tolist()) == sorted(set(a.tolist()))
    torch.testing.assert_close(c[a], x[:3])
    # the 2 extra clusters stay empty and keep their starting rows (unit vectors, not zeros)
    torch.testing.assert_close(c.norm(dim=1), torch.ones(5))
    assert all(any(torch.allclose(row, r) for r in x[:3]) for row in c)


# --- loss -------------------------------------------------------------------------------------------------


def test_loss_against_a_direct_loop_with_shared_targets_and_missing_ones() -> None:
    g = torch.Generator().manual_seed(0)
    b, views, heads = 5, 3, [4, 3]  # 2 global views + 1 local one
    scores = [torch.randn(views * b, k, generator=g) for k in heads]
    targets = torch.tensor([[0, 3, NO_CLUSTER, 1, 2], [2, NO_CLUSTER, 1, 0, 0]])
    expected = 0.0
    for h in range(2):
        terms = [
            -float(torch.log_softmax(scores[h][v * b + i] / 0.1, dim=0)[targets[h, i]])
            for v in range(views)
            for i in range(b)
            if targets[h, i] != NO_CLUSTER
        ]
        expected += sum(terms) / len(terms)
    assert cluster_prediction(scores, targets, 0.1).item() == pytest.approx(expected / 2, rel=1e-5)
    # no image with a cluster: 0, not NaN
    s = torch.randn(6, 4, requires_grad=True)
    loss = cluster_prediction([s], torch.full((1, 3), NO_CLUSTER), 0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros(6, 4))


# --- the method: clusters, prototypes, memory -----------------------------------------------------------------


def test_epoch_start_fills_the_memory_and_sets_prototypes_to_each_heads_centroids() -> None:
    data = epoch_batches()
    m = started(tiny(), epoch=3, data=data)
    seen = torch.zeros(N_IMAGES, dtype=torch.bool)
    seen[:40] = True
    assert torch.equal(m.memory_valid, seen)
    # the first pass: every batch's two global views, embedded as the training step embeds them
    with torch.no_grad():
        views, index = data[2]
        z = m.embed(views).view(2, 8, -1)
    torch.testing.assert_close(m.memory[:, index], z)
    rows = seen.nonzero().squeeze(1)
    for h, k in enumerate([4, 3, 5]):
        generator = torch.Generator().manual_seed(mix_seed(m.recipe.train.seed, 3, h))
        centroids, clusters = spherical_kmeans(m.memory[h % 2, rows], k, 10, generator)  # view h % 2
        assert torch.equal(m.prototypes[h].weight, centroids)
        assert torch.equal(m.assignments[h, rows], clusters)
        assert (m.assignments[h, 40:] == NO_CLUSTER).all()  # never seen: no target
        # and directly: each remembered image sits in the cluster of its most similar prototype
        assert torch.equal(clusters, (m.memory[h % 2, rows] @ m.prototypes[h].weight.T).argmax(dim=1))
    assert m.epoch_end(4) == {"cluster_usage": pytest.approx(m._cluster_usage)} and 0 < m._cluster_usage <= 1


def test_prototypes_stay_bit_identical_through_optimizer_steps_with_weight_decay() -> None:
    m = started(tiny(("optim.name", "sgd"), ("optim.weight_decay", 0.1), ("optim.exclude_bias_norm", False)))
    opt = build_optimizer(m.param_groups(), m.recipe.optim, 8)
    assert any(n.startswith("prototypes.") for g in opt.param_groups for n in g["names"])  # decayed, if it had a grad
    before = [p.detach().clone() for p in m.prototypes.parameters()]
    backbone_before = m.backbone.conv1[0].weight.detach().clone()
    for step, (views, index) in enumerate(epoch_batches(seed=1)[:2]):
        out = m.training_step(views, step, index)
        opt.zero_grad()
        out.loss.backward()
        assert all(p.grad is not None for p in m.prototypes.parameters())  # the loss does reach them...
        m.before_optimizer_step(step, 10)
        assert all(p.grad is None for p in m.prototypes.parameters())  # ...but k-means alone sets them
        opt.step()
        m.after_optimizer_step(step, 10)
    assert all(torch.equal(a, b) for a, b in zip(before, m.prototypes.parameters(), strict=True))
    assert not torch.equal(backbone_before, m.backbone.conv1[0].weight)


def test_memory_is_written_after_the_optimizer_step_with_that_steps_global_view_features() -> None:
    multi_crop = tiny_method("deepclusterv2", *SMALL, ("views.1.count", 2), ("views.1.size", 16))
    m = started(multi_crop, data=epoch_batches(num_views=4))
    assert m.recipe.num_views == 4 and m.memory.shape[0] == 2  # 2 global + 2 local views; 2 in the memory
    g = torch.Generator().manual_seed(5)
    for step, index in enumerate([torch.tensor([3, 17, 40, 8]), torch.tensor([17, 1, 44, 39])]):
        views = [torch.randn(4, 3, s, s, generator=g) for s in (32, 32, 16, 16)]
        with torch.no_grad():  # training-mode BatchNorm: the same batch gives the same features again
            z = m.embed(views)  # 16 x D, view-major
        memory, valid = m.memory.clone(), m.memory_valid.clone()
        targets = m.assignments[:, index].clone()
        out = m.training_step(views, step, index)
        # every view, local crops included, predicts its image's cluster; images 40+ (never seen) have none
        scores = [z @ head.weight.T for head in m.prototypes]
        expected = cluster_prediction(scores, targets, 0.1)
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert torch.equal(m.memory, memory)  # nothing written before the optimizer step
        m.after_optimizer_step(step, 10)
        others = torch.ones(N_IMAGES, dtype=torch.bool)
        others[index] = False
        torch.testing.assert_close(m.memory[:, index], z[:8].view(2, 4, -1))
        assert torch.equal(m.memory[:, others], memory[:, others])
        assert m.memory_valid[index].all() and torch.equal(m.memory_valid[others], valid[others])
    assert m.memory_valid.sum() == 42  # 40 from the first pass, then 40 and 44


def test_first_pass_runs_once_and_never_again_after_a_resume() -> None:
    data = epoch_batches()
    calls = []

    def batches():
        calls.append(1)
        return iter(data)

    m = tiny()
    m.bind_data(N_IMAGES, None)
    m.epoch_start(0, batches)
    assert len(calls) == 1 and int(m.memory_initialized) == 1
    m.epoch_start(1, batches)
    assert len(calls) == 1
    # a resumed run: bind_data, then the checkpoint's state; the memory comes back, the pass does not run
    state = copy.deepcopy(m.state_dict())
    assert {"memory", "memory_valid", "memory_initialized", "assignments"} <= set(state)
    resumed = tiny()
    resumed.bind_data(N_IMAGES, None)
    resumed.load_state_dict(state)
    resumed.epoch_start(2, batches)
    m.epoch_start(2, batches)
    assert len(calls) == 1
    assert torch.equal(resumed.memory, m.memory) and torch.equal(resumed.assignments, m.assignments)
    for a, b in zip(resumed.prototypes.parameters(), m.prototypes.parameters(), strict=True):
        assert torch.equal(a, b)


def test_same_seed_same_clusters_and_the_seed_and_epoch_pick_the_initial_centroids() -> None:
    a, b = started(tiny()), started(tiny())
    assert torch.equal(a.assignments, b.assignments)
    assert all(torch.equal(p, q) for p, q in zip(a.prototypes.parameters(), b.prototypes.parameters(), strict=True))
    other_seed = started(tiny(("train.seed", 7)))  # same weights (tiny_method seeds torch), another k-means start
    assert torch.equal(other_seed.memory, a.memory)
    assert not torch.equal(other_seed.prototypes[0].weight, a.prototypes[0].weight)
    a.cluster(1)  # another epoch, same memory: another start too
    assert not torch.equal(a.prototypes[0].weight, b.prototypes[0].weight)


def test_steps_need_data_bound_and_clusters() -> None:
    m = tiny()
    views, index = epoch_batches()[0]
    with pytest.raises(RecipeError, match="bind_data"):
        m.training_step(views, 0, index)
    m.bind_data(N_IMAGES, None)
    with pytest.raises(RuntimeError, match="epoch_start"):
        m.training_step(views, 0, index)
    with pytest.raises(RecipeError, match="empty"):
        m.epoch_start(0, lambda: iter([]))


def test_bench_clusters_before_its_steps(tmp_path: Path) -> None:
    from ssl_cli.train.bench import bench

    data = write_image_folder(tmp_path / "data", per_class=8, classes=2)
    recipe = load_recipe("deepclusterv2-cifar", [*TINY, *SMALL, ("train.batch_size", 8)])
    result = bench(recipe, str(data), steps=1, warmup_steps=0)
    assert result["method"] == "deepclusterv2" and result["step_images_per_second"] > 0


# --- recipes and bad values -----------------------------------------------------------------------------


def test_recipes_load_with_the_reference_settings() -> None:
    r = load_recipe("deepclusterv2")
    m = r.method
    assert (m.num_prototypes, m.temperature, m.kmeans_iterations, m.num_targets) == ([3000] * 3, 0.1, 10, 2)
    assert (m.proj_hidden_dim, m.proj_output_dim, r.backbone.name) == (2048, 128, "resnet50")
    assert [(v.count, v.size, v.scale) for v in r.views] == [(2, 224, [0.14, 1.0]), (6, 96, [0.05, 0.14])]
    assert (r.optim.name, r.optim.lr, r.optim.weight_decay, r.optim.trust_coefficient) == ("lars", 0.3, 1e-6, 0.001)
    assert (r.schedule.warmup_epochs, r.schedule.min_lr, r.train.epochs, r.train.batch_size) == (10, 0.0048, 800, 4096)
    assert r.train.sync_batchnorm
    c = load_recipe("deepclusterv2-cifar")
    assert c.method.num_prototypes == [3000] * 3 and c.backbone.small_stem and c.backbone.name == "resnet18"
    assert [(v.count, v.size, v.scale, v.blur_prob) for v in c.views] == [(2, 32, [0.08, 1.0], 0.0)]
    assert (c.optim.lr, c.optim.trust_coefficient, c.optim.weight_decay, c.optim.clip_lr) == (0.6, 0.02, 1e-6, True)
    assert (c.schedule.warmup_epochs, c.schedule.min_lr, c.train.epochs, c.train.batch_size) == (11, 0.0006, 1000, 256)
    demo = load_recipe("deepclusterv2-cifar", demo_overrides("deepclusterv2"))
    assert demo.method.num_prototypes == [100, 100, 100]


def test_bad_values_are_one_clear_error() -> None:
    for key, value in [
        ("method.num_prototypes", []),
        ("method.num_prototypes", [3000, 0]),
        ("method.temperature", 0.0),
        ("method.kmeans_iterations", 0),
        ("method.num_targets", 0),
    ]:
        assert_one_line_error(key, load_recipe, "deepclusterv2", [(key, value)])
    assert_one_line_error("method.num_targets: 3 target views", tiny, ("method.num_targets", 3))
    assert_one_line_error("needs at least 2 views", tiny, ("views.0.count", 1))
