"""YADIM: the loss against a re-derivation with explicit loops (both denominators, several positives per anchor), the
sum over positives told apart from a mean of single-positive terms, only the last feature map reaching the loss,
positives from the same image's other view, and a tiny run through the toolkit (resume, monitors, bench, export,
inspect).

The reference below is written from the paper's formula (Falcon & Cho 2020, arXiv:2009.00104, Sec. 5 (5)), with
Python loops over anchors, images and locations and nothing of ``ssl_cli.losses.yadim``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import assert_resume_is_bit_identical, invoke, one_json, tiny_toolkit_run

import ssl_cli
import ssl_cli.methods.yadim as yadim_method
from conftest import TINY, assert_one_line_error
from ssl_cli.config import load_recipe
from ssl_cli.encoders.taps import feature_modules
from ssl_cli.export.backbone import export_backbone
from ssl_cli.losses.yadim import Scoring, nce_sum_positives, yadim_loss
from ssl_cli.train.bench import bench
from ssl_cli.train.pretrain import build_method

# AMDIM's 32x32 encoder at a tiny width and depth: the structure of the real one, fast enough for a few steps
SMALL = [("backbone.name", "amdim_32"), ("backbone.kwargs.ndf", 8), ("backbone.kwargs.n_rkhs", 32)]
SMALL += [("backbone.kwargs.n_depth", 1)]
SMALL_KWARGS = {"ndf": 8, "n_rkhs": 32, "n_depth": 1}


# --- the loss against explicit loops ------------------------------------------------------------------------


def score(a: list, b: list, tclip: float, scaled: bool, cosine_temperature: float = 0.0) -> float:
    """The dot product (over sqrt(D) if ``scaled``) or, given a temperature, the cosine over it; then the clip."""
    s = sum(x * y for x, y in zip(a, b, strict=True))
    if cosine_temperature:
        s = s / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b)) / cosine_temperature
    elif scaled:
        s = s / math.sqrt(len(a))
    return tclip * math.tanh(s / tclip) if tclip > 0 else s


def reference_direction(anchors, targets, tclip: float, scaled: bool, denominator: str, cos_t: float = 0.0) -> float:
    """-log(sum over the positives of exp / denominator), averaged over anchors; ``anchors[i][l]`` and
    ``targets[j][l]`` are vectors (image, location); image i's positives are every location of target image i."""
    total, count = 0.0, 0
    for i, locations in enumerate(anchors):
        for a in locations:
            positive = sum(math.exp(score(a, t, tclip, scaled, cos_t)) for t in targets[i])
            negative = sum(math.exp(score(a, t, tclip, scaled, cos_t)) for j in range(len(targets)) if j != i
                           for t in targets[j])  # fmt: skip
            total += -math.log(positive / (negative + (positive if denominator == "all" else 0.0)))
            count += 1
    return total / count


def vectors(m: torch.Tensor) -> list:
    """N x D x H x W -> per image, per location (row-major), the D-vector as a list."""
    return [[m[i, :, p // m.shape[3], p % m.shape[3]].tolist() for p in range(m.shape[2] * m.shape[3])]
            for i in range(m.shape[0])]  # fmt: skip


def maps(n: int = 3, d: int = 4, side: int = 2, scale: float = 1.0, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(n, d, side, side, generator=g, dtype=torch.float64) for _ in range(2)]


@pytest.mark.parametrize("denominator", ["all", "negatives"])
@pytest.mark.parametrize(
    "scale, tclip, score_scale",
    [(1.0, 0.0, "sqrt_dim"), (1.0, 20.0, "none"), (4.0, 2.0, "sqrt_dim")],  # the last: far beyond the clip
    ids=["unclipped", "plain-dot", "clipped"],
)
def test_the_loss_matches_the_explicit_loops(denominator: str, scale: float, tclip: float, score_scale: str) -> None:
    m = maps(scale=scale)  # 2x2 maps: 4 anchors per image, 4 positives per anchor
    got = yadim_loss(m, Scoring(score_scale=score_scale, tclip=tclip), denominator=denominator)
    v = [vectors(t) for t in m]
    want = [reference_direction(v[a], v[b], tclip, score_scale == "sqrt_dim", denominator) for a, b in ((0, 1), (1, 0))]
    assert got["nce_12"].item() == pytest.approx(want[0], rel=1e-10)
    assert got["nce_21"].item() == pytest.approx(want[1], rel=1e-10)
    assert got["loss"].item() == pytest.approx(0.5 * (want[0] + want[1]), rel=1e-10)


@pytest.mark.parametrize("tclip", [0.0, 5.0])
def test_the_cosine_similarity_matches_the_explicit_loops(tclip: float) -> None:
    """``similarity = "cosine"``: cos / temperature, whatever the vectors' lengths (score_scale plays no part)."""
    m = maps(scale=3.0)
    v = [vectors(t) for t in m]
    for score_scale in ("sqrt_dim", "none"):
        got = yadim_loss(m, Scoring("cosine", score_scale, temperature=0.2, tclip=tclip))
        want = [reference_direction(v[a], v[b], tclip, False, "all", cos_t=0.2) for a, b in ((0, 1), (1, 0))]
        assert got["loss"].item() == pytest.approx(0.5 * sum(want), rel=1e-10)
    # the lengths no longer count: scaling one image's vectors leaves the loss as it was; the dot product's moves
    longer = [m[0] * torch.tensor([5.0, 1.0, 1.0], dtype=torch.float64).view(3, 1, 1, 1), m[1]]
    cosine = Scoring("cosine", temperature=0.2, tclip=tclip)
    assert yadim_loss(longer, cosine)["loss"].item() == pytest.approx(yadim_loss(m, cosine)["loss"].item(), rel=1e-12)
    assert yadim_loss(longer)["loss"].item() != pytest.approx(yadim_loss(m)["loss"].item(), rel=1e-3)


def test_the_sum_over_positives_is_not_a_mean_of_single_positive_terms() -> None:
    """With several positives, sum-in-the-numerator and the mean of one InfoNCE term per positive differ."""
    m = maps(side=3)  # 9 positives per anchor
    v = [vectors(t) for t in m]
    got = nce_sum_positives(m[0].flatten(2), m[1].flatten(2), 0, Scoring(tclip=0.0)).item()
    single = []  # each positive alone in the numerator, the same denominator (every location of every image)
    for i, locations in enumerate(v[0]):
        for a in locations:
            everything = math.log(sum(math.exp(score(a, t, 0.0, True)) for img in v[1] for t in img))
            single += [everything - score(a, t, 0.0, True) for t in v[1][i]]
    mean_single = sum(single) / len(single)
    assert got == pytest.approx(reference_direction(v[0], v[1], 0.0, True, "all"), rel=1e-12)
    assert mean_single - got > 1.0  # log(9) apart, roughly: the sum's log is above each positive's score
    # with one positive per anchor (1x1 maps) the two coincide, and both are the cross-entropy over the images
    one = maps(side=1)
    logits = one[0].flatten(1) @ one[1].flatten(1).T / 2.0
    want = F.cross_entropy(logits, torch.arange(3))
    assert nce_sum_positives(one[0].flatten(2), one[1].flatten(2), 0, Scoring(tclip=0.0)).item() == pytest.approx(
        want.item()
    )


def test_one_direction_against_a_hand_computed_case() -> None:
    """Two images, one channel, two locations, no scaling or clip: the formula written out by hand."""
    a = torch.tensor([[[1.0, 0.5]], [[-1.0, 2.0]]], dtype=torch.float64)  # 2 images x 1 x 2 locations
    t = torch.tensor([[[0.5, -1.0]], [[2.0, 1.0]]], dtype=torch.float64)
    e = math.exp
    # anchor (0, 0) = 1: positives 0.5, -1; negatives 2, 1. Anchor (0, 1) = 0.5: 0.25, -0.5; 1, 0.5.
    # anchor (1, 0) = -1: positives -2, -1; negatives -0.5, 1. Anchor (1, 1) = 2: 4, 2; 1, -2.
    cases = [((0.5, -1.0), (2.0, 1.0)), ((0.25, -0.5), (1.0, 0.5))]
    cases += [((-2.0, -1.0), (-0.5, 1.0)), ((4.0, 2.0), (1.0, -2.0))]
    for denominator, with_pos in (("negatives", 0.0), ("all", 1.0)):
        want = sum(-math.log((e(p[0]) + e(p[1])) / (e(q[0]) + e(q[1]) + with_pos * (e(p[0]) + e(p[1]))))
                   for p, q in cases) / 4  # fmt: skip
        got = nce_sum_positives(a, t, 0, Scoring(score_scale="none", tclip=0.0), denominator=denominator)
        assert got.item() == pytest.approx(want, rel=1e-12), denominator


def test_the_denominators_differ_and_only_all_is_bounded_below() -> None:
    m = maps(scale=3.0)
    same = [m[0], m[0].clone()]  # the views agree: positives dominate
    kw = {"scoring": Scoring(score_scale="none", tclip=0.0)}
    everything, negatives = yadim_loss(same, denominator="all", **kw), yadim_loss(same, denominator="negatives", **kw)
    assert everything["loss"].item() >= 0.0 and negatives["loss"].item() < 0.0
    # log(1 + pos / neg) - log(pos / neg) = log(1 + neg / pos): the two differ by a positive amount
    assert everything["loss"].item() > negatives["loss"].item()


def test_gradients_match_finite_differences_and_reach_anchors_and_targets() -> None:
    m = [t.clone().requires_grad_() for t in maps(n=3, d=3, side=2, scale=2.0)]
    for denominator in ("all", "negatives"):
        assert torch.autograd.gradcheck(
            lambda a, b, d=denominator: yadim_loss([a, b], Scoring(tclip=3.0), denominator=d)["loss"], m
        )
    # one direction alone: view 1 as anchors and view 2 as the positive / negative sets both get a gradient
    out = yadim_loss(m)
    grads = torch.autograd.grad(out["nce_12"], m)
    assert all(g.abs().sum() > 0 for g in grads)


def test_the_loss_runs_in_fp32_under_bf16_autocast() -> None:
    m = [t.float() for t in maps()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = yadim_loss([t.to(torch.bfloat16) for t in m])
    assert out["loss"].dtype == torch.float32
    want = yadim_loss([t.to(torch.bfloat16).float() for t in m])["loss"]
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)


# --- the method: which maps, which positives -----------------------------------------------------------------------


def tiny(*overrides):
    torch.manual_seed(0)
    return build_method(load_recipe("yadim-cifar", [*TINY, *overrides, ("train.batch_size", 6)])).train()


def test_only_the_last_feature_map_reaches_the_loss(monkeypatch) -> None:
    """The loss sees exactly two maps, each the backbone's last feature map (``forward_features``) of one view: a
    spatial one on timm's test ResNet at 64 px (2x2: several positives per anchor), the 1x1 one on AMDIM's encoder."""
    for overrides, size, side in (([("views.*.size", 64)], 64, 2), (SMALL, 32, 1)):
        m = tiny(*overrides)
        assert m.tap.module == feature_modules(m.backbone)[-1] and m.tap.size == (side, side)
        seen: list = []

        def spy(maps, *args, seen=seen, **kw):
            seen.append(maps)
            return yadim_loss(maps, *args, **kw)

        monkeypatch.setattr(yadim_method, "yadim_loss", spy)
        g = torch.Generator().manual_seed(0)
        views = [torch.randn(6, 3, size, size, generator=g) for _ in range(2)]
        m.training_step(views, 0)
        assert len(seen) == 1 and len(seen[0]) == 2
        with torch.no_grad():
            for got, x in zip(seen[0], views, strict=True):
                assert torch.equal(got, m.backbone.forward_features(x)), overrides


def test_the_recipes_similarity_reaches_the_loss() -> None:
    """``method.similarity = "cosine"`` and its temperature: the step's loss is the cosine loss of the two views'
    last maps (and not the dot product's)."""
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(6, 3, 64, 64, generator=g) for _ in range(2)]
    m = tiny(("views.*.size", 64), ("method.similarity", "cosine"), ("method.temperature", 0.3))
    loss = m.training_step(views, 0).loss
    with torch.no_grad():
        maps = [m.backbone.forward_features(x) for x in views]
    assert loss.item() == pytest.approx(yadim_loss(maps, Scoring("cosine", temperature=0.3))["loss"].item(), rel=1e-5)
    assert loss.item() != pytest.approx(yadim_loss(maps)["loss"].item(), rel=1e-3)


def test_positives_are_the_same_images_other_view() -> None:
    m = tiny(("views.*.size", 64))
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(6, 3, 64, 64, generator=g) for _ in range(2))
    perm = torch.tensor([1, 2, 3, 4, 5, 0])
    base = m.training_step([x1, x2], 0).loss.item()
    # the same pairs in another order: the same loss; one view's batch permuted: other positives, another loss
    assert m.training_step([x1[perm], x2[perm]], 0).loss.item() == pytest.approx(base, rel=1e-5)
    assert m.training_step([x1, x2[perm]], 0).loss.item() != pytest.approx(base, rel=1e-3)
    # identical views make the positives the best matches: lower than with mismatched pairs
    assert m.training_step([x1, x1], 0).loss.item() < m.training_step([x1, x1[perm]], 0).loss.item()


def test_a_step_trains_the_whole_backbone_and_nothing_else() -> None:
    m = tiny(*SMALL)
    g = torch.Generator().manual_seed(0)
    m.training_step([torch.randn(6, 3, 32, 32, generator=g) for _ in range(2)], 0).loss.backward()
    names = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert names and all(n.startswith("backbone.") for n in dict(m.named_parameters()))
    assert "backbone.layer_list.0.conv.weight" in names and "backbone.layer_list.8.weight" in names


def test_bad_settings_are_one_line() -> None:
    def build(*overrides):
        return build_method(load_recipe("yadim", [*TINY, *overrides]))

    two_sizes = ("views", [{"count": 1, "size": 32}, {"count": 1, "size": 24}])
    assert_one_line_error(r"views: YADIM needs 2 views at one size", build, two_sizes)
    assert_one_line_error(r"train.batch_size: YADIM needs at least 2 images", build, ("train.batch_size", 1))
    vit = [("backbone.name", "vit_tiny_patch16_224"), ("backbone.img_size", 32), ("backbone.patch_size", 8)]
    assert_one_line_error(r"no layer with N x C x H x W feature maps", build, *vit, ("backbone.kwargs.depth", 1))
    assert_one_line_error(r"views.0.size: 8 px is too small for 'amdim_32'", build, *SMALL, ("views.*.size", 8))
    assert_one_line_error(r"method.denominator: Input should be 'all' or 'negatives'", build,
                          ("method.denominator", "positives"))  # fmt: skip
    assert_one_line_error(r"method.similarity: Input should be 'dot' or 'cosine'", build, ("method.similarity", "l2"))
    assert_one_line_error(r"method.temperature: Input should be greater than 0", build, ("method.temperature", 0))


def test_the_cifar_recipe_is_the_main_one_at_32_px() -> None:
    main, cifar = load_recipe("yadim").to_dict(), load_recipe("yadim-cifar").to_dict()
    assert {k for k in main if main[k] != cifar[k]} == {"recipe", "backbone", "data", "views", "train"}
    assert cifar["backbone"]["name"] == "amdim_32" and cifar["views"][0]["size"] == 32
    want = {"name": "yadim", "denominator": "all", "similarity": "dot", "score_scale": "sqrt_dim", "temperature": 0.1}
    assert cifar["method"] == main["method"] == {**want, "tclip": 20.0}


# --- a tiny run through the toolkit -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    recipe = load_recipe("yadim-cifar", [*TINY, *SMALL, ("train.batch_size", 8), ("train.epochs", 2)])
    return tiny_toolkit_run(tmp_path_factory.mktemp("yadim"), recipe)


def test_monitors_and_metrics_are_logged(run) -> None:
    records = [json.loads(line) for line in (run.ckpt.parents[1] / "metrics.jsonl").read_text().splitlines()]
    assert {"nce_12", "nce_21", "online_top1", "knn_top1"} <= set(records[-1])


def test_the_export_loads_with_timm_and_load_backbone_with_the_same_features(run) -> None:
    out = run.root / "export" / "backbone.safetensors"
    assert export_backbone(run.ckpt, out)["architecture"] == "amdim_32"
    config = json.loads(out.with_suffix(".json").read_text())
    assert config["timm_kwargs"] == SMALL_KWARGS
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    from_timm = timm.create_model(
        "amdim_32", num_classes=0, pretrained=True, pretrained_cfg_overlay=dict(file=str(out)), **config["timm_kwargs"]
    ).eval()
    with torch.no_grad():
        features = from_timm(x)
        assert torch.equal(features, ssl_cli.load_backbone(str(run.ckpt))(x))
        assert not torch.allclose(features, timm.create_model("amdim_32", num_classes=0, **SMALL_KWARGS).eval()(x))
    info = one_json(invoke("inspect", run.ckpt, "--json"))
    assert info["method"] == "yadim" and info["backbone"]["name"] == "amdim_32" and info["num_features"] == 32


def test_bench_replays_both_views(run) -> None:
    result = bench(run.recipe, run.train, steps=1, warmup_steps=1)
    assert result["views"] == [[3, 32, 32], [3, 32, 32]] and result["step_images_per_second"] > 0


def test_an_interrupted_and_resumed_run_ends_bit_identical(run, tmp_path: Path) -> None:
    recipe = load_recipe("yadim-cifar", [*TINY, *SMALL, ("train.batch_size", 8), ("train.epochs", 3)])
    assert_resume_is_bit_identical(recipe, run.train, tmp_path)


def test_the_cli_trains_with_per_sample_augmentation(run, tmp_path: Path) -> None:
    common = ["--data", run.train, "--batch-size", "8", "--device", "cpu", "--num-workers", "0"]
    small = [a for k, v in SMALL for a in ("--set", f"{k}={v}")]
    out = one_json(invoke("pretrain", "--recipe", "yadim-cifar", *common, *small, "--set", "data.augment=sample",
                          "--epochs", "1", "--out", tmp_path / "ok", "--json"))  # fmt: skip
    assert Path(out["checkpoint"]).is_file() and math.isfinite(out["loss"])
