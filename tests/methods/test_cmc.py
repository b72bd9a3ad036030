"""CMC: the colour conversions against independent values, each view to its own network, the cross-view NCE / softmax
/ InfoNCE terms against explicit loops, the bank update step by step, core view vs full graph, the encoder's timm
registration and export, and a tiny run through the toolkit (resume, monitors, bench, export, inspect).

The references below are written from the paper and the official code's description of the scores (arXiv:1906.05849,
Eq. (2)-(3), Sec. 3.3; github.com/HobbitLong/CMC NCE/NCEAverage.py, NCE/NCECriterion.py) and from scikit-image's colour
formulas, with Python loops over images, noise samples and pixels and nothing of ``ssl_cli.losses``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import (
    EVAL,
    assert_drawn_for_the_global_batch,
    assert_resume_is_bit_identical,
    assert_torchscript_export_and_inspect,
    invoke,
    one_json,
    tiny_checkpoint,
    user_error,
)
from safetensors import safe_open
from safetensors.torch import load_file

import ssl_cli
import ssl_cli.methods.cmc as cmc_method
from conftest import TINY, assert_one_line_error, write_image_folder
from ssl_cli.artifacts.checkpoint import read_checkpoint
from ssl_cli.backbones import build_backbone
from ssl_cli.config import load_recipe
from ssl_cli.config.schema import BackboneConfig
from ssl_cli.encoders.cmc import ENCODERS, CMCEncoder
from ssl_cli.encoders.colour import rgb_to_lab, rgb_to_ycbcr, rgb_to_ydbdr
from ssl_cli.errors import SSLError
from ssl_cli.eval.cache import FeatureCache
from ssl_cli.eval.run import features, setup
from ssl_cli.export.backbone import export_backbone
from ssl_cli.export.formats import export_model
from ssl_cli.losses.cmc import cross_view_pairs
from ssl_cli.train.bench import bench, count_flops, record_encoder_calls, replay_step
from ssl_cli.train.pretrain import build_method, pretrain

SMALL = [("backbone.name", "cmc_test_resnet"), ("views.*.size", 32)]
SMALL_CIFAR = [*SMALL, ("backbone.small_stem", False)]  # cmc-cifar on the tiny encoder (test_resnet: a deep stem)


def tiny(*overrides, batch: int = 8):
    torch.manual_seed(0)
    return build_method(load_recipe("cmc", [*TINY, *SMALL, ("train.batch_size", batch), *overrides])).train()


# --- colour spaces ----------------------------------------------------------------------------------------------

# sRGB corners in CIE Lab (D65): the extremes the official code normalises with (train_CMC.py: a in [-86.183, 98.233],
# b in [-107.857, 94.478], L in [0, 100]) and the primaries as scikit-image's rgb2lab gives them
KNOWN_LAB = {
    (1, 1, 1): (100.0, 0.0, 0.0),
    (0, 0, 0): (0.0, 0.0, 0.0),
    (1, 0, 0): (53.2408, 80.0925, 67.2032),
    (0, 1, 0): (87.7347, -86.1827, 83.1793),
    (0, 0, 1): (32.2970, 79.1875, -107.8602),
}


def lab_by_hand(r: float, g: float, b: float) -> tuple[float, float, float]:
    """scikit-image's rgb2lab for one pixel, written out (sRGB -> linear -> XYZ -> Lab, D65, 2 degrees)."""
    lin = [((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92 for c in (r, g, b)]
    x = (0.412453 * lin[0] + 0.357580 * lin[1] + 0.180423 * lin[2]) / 0.95047
    y = 0.212671 * lin[0] + 0.715160 * lin[1] + 0.072169 * lin[2]
    z = (0.019334 * lin[0] + 0.119193 * lin[1] + 0.950227 * lin[2]) / 1.08883
    fx, fy, fz = (t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116 for t in (x, y, z))
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def pixels(colours) -> torch.Tensor:
    return torch.tensor(list(colours), dtype=torch.float64).view(-1, 3, 1, 1)


def test_lab_of_known_colours_and_the_official_normalisation_ranges() -> None:
    lab = rgb_to_lab(pixels(KNOWN_LAB)).view(-1, 3)
    for got, want in zip(lab.tolist(), KNOWN_LAB.values(), strict=True):
        assert got == pytest.approx(want, abs=5e-3)
    corners = rgb_to_lab(pixels([(r, g, b) for r in (0, 1) for g in (0, 1) for b in (0, 1)])).view(-1, 3)
    assert corners[:, 1].min().item() == pytest.approx(-86.183, abs=1e-3)  # green
    assert corners[:, 1].max().item() == pytest.approx(98.233, abs=1e-3)  # magenta
    assert corners[:, 2].min().item() == pytest.approx(-107.857, abs=1e-3)  # blue
    assert corners[:, 2].max().item() == pytest.approx(94.478, abs=1e-3)  # yellow


def test_lab_of_random_colours_against_the_formulas_by_hand() -> None:
    rgb = torch.rand(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rgb[:8] *= 0.03  # dark colours: the linear parts of both curves
    lab = rgb_to_lab(rgb.view(-1, 3, 1, 1)).view(-1, 3)
    for got, c in zip(lab.tolist(), rgb.tolist(), strict=True):
        assert got == pytest.approx(lab_by_hand(*c), abs=1e-9)


def test_ydbdr_and_ycbcr_of_known_colours() -> None:
    # SECAM's YDbDr: Db = -0.450 R - 0.883 G + 1.333 B, Dr = -1.333 R + 1.116 G + 0.217 B
    ydbdr = rgb_to_ydbdr(pixels([(1, 1, 1), (1, 0, 0), (0, 0, 1), (0.5, 0.5, 0.5)])).view(-1, 3).tolist()
    for got, want in zip(ydbdr, [(1, 0, 0), (0.299, -0.45, -1.333), (0.114, 1.333, 0.217), (0.5, 0, 0)], strict=True):
        assert got == pytest.approx(want, abs=1e-12)
    # BT.601 8-bit ranges: Y 16 (black) to 235 (white), chroma centred at 128
    ycbcr = rgb_to_ycbcr(pixels([(0, 0, 0), (1, 1, 1), (1, 0, 0)])).view(-1, 3).tolist()
    for got, want in zip(ycbcr, [(16, 128, 128), (235, 128, 128), (81.481, 90.203, 240.0)], strict=True):
        assert got == pytest.approx(want, abs=1e-3)


def test_the_encoder_normalises_each_space_and_splits_its_channels() -> None:
    rgb = pixels([(1, 1, 1), (0, 0, 0), (0, 1, 0)]).float()
    lab = timm.create_model("cmc_test_resnet", num_classes=0)
    l_view, ab_view = lab.split_views(rgb)
    assert l_view.shape[1] == 1 and ab_view.shape[1] == 2
    assert l_view.flatten().tolist() == pytest.approx([1.0, -1.0, (87.7347 - 50) / 50], abs=1e-4)  # L in [0, 100]
    assert ab_view[2, 0].item() == pytest.approx(-1.0, abs=1e-4)  # green: the gamut's lowest a
    # YDbDr with PyContrast's CMC constants (mean 0.457, -0.082, -0.052; std 0.5, 1.331, 1.333)
    y, a, b = timm.create_model("cmc_test_resnet", num_classes=0, space="ydbdr", split="Y,Db,Dr").split_views(rgb)
    assert y.flatten().tolist() == pytest.approx([(1 - 0.457) / 0.5, -0.457 / 0.5, (0.587 - 0.457) / 0.5], abs=1e-6)
    assert a[2].item() == pytest.approx((-0.883 + 0.082) / 1.331, abs=1e-6)
    assert b[2].item() == pytest.approx((1.116 + 0.052) / 1.333, abs=1e-6)


def test_the_conversion_stays_fp32_under_bf16_autocast() -> None:
    rgb = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model = timm.create_model("cmc_test_resnet", num_classes=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        views = model.split_views(rgb)
    assert all(v.dtype == torch.float32 for v in views)
    assert torch.equal(torch.cat(views, 1), torch.cat(model.split_views(rgb), 1))


# --- the encoder: one network per view -----------------------------------------------------------------------


def test_each_view_goes_to_its_own_network_only(monkeypatch) -> None:
    model = timm.create_model("cmc_test_resnet", num_classes=0).eval()
    assert [b.conv1[0].in_channels for b in model.branches] == [1, 2]  # test_resnet's deep stem: L 1, ab 2
    rgb = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    lab = (rgb_to_lab(rgb) - torch.tensor([50.0, 6.025, -6.6895]).view(1, 3, 1, 1)) / torch.tensor(
        [50.0, 92.208, 101.1675]
    ).view(1, 3, 1, 1)
    l_view, ab_view = model.split_views(rgb)
    torch.testing.assert_close(l_view, lab[:, :1])
    torch.testing.assert_close(ab_view, lab[:, 1:])
    with torch.no_grad():
        base = model.forward_views(rgb)
        other = ab_view.flip(0)  # another image's ab channels, the same L
        monkeypatch.setattr(model, "split_views", lambda x: [l_view, other])
        changed = model.forward_views(rgb)
    assert torch.equal(changed[0], base[0])  # the L network never sees ab
    assert not torch.allclose(changed[1], base[1])
    with torch.no_grad():
        monkeypatch.setattr(model, "split_views", lambda x: [l_view.flip(0), ab_view])
        changed = model.forward_views(rgb)
    assert torch.equal(changed[1], base[1]) and not torch.allclose(changed[0], base[0])


def test_one_crop_per_view_takes_each_views_channels_from_its_own_crop() -> None:
    model = timm.create_model("cmc_test_resnet", num_classes=0).eval()
    g = torch.Generator().manual_seed(8)
    crops = [torch.rand(2, 3, 32, 32, generator=g) for _ in range(3)]
    with torch.no_grad():
        mixed = model.forward_views(torch.stack(crops[:2]))
        assert torch.equal(mixed[0], model.forward_views(crops[0])[0])  # L of crop 0
        assert torch.equal(mixed[1], model.forward_views(crops[1])[1])  # ab of crop 1
        assert torch.equal(model.forward_views(torch.stack([crops[0], crops[2]]))[0], mixed[0])
    with pytest.raises(ValueError, match=r"input \(3, 2, 3, 32, 32\): N x 3 x H x W, or 2 x N x 3 x H x W"):
        model(torch.stack(crops))
    method = tiny(("views.0.count", 2), ("method.nce_k", 6))
    method.bind_data(20, None)
    out = method.training_step(crops[:2], 0, torch.arange(2))
    assert torch.isfinite(out.loss)
    assert_one_line_error(r"views: CMC takes one crop \(every colour view from it\) or one crop per colour view \(2 "
                          r"here\) of one size, the recipe's \[\[views\]\] give 3 of sizes \[32\]", tiny,
                          ("views.0.count", 3))  # fmt: skip
    two_sizes = ("views", [{"count": 1, "size": 32}, {"count": 1, "size": 24}])
    assert_one_line_error(r"give 2 of sizes \[24, 32\]", tiny, two_sizes)


def test_training_calls_the_module_and_the_online_classifier_reads_the_output_views() -> None:
    method = tiny(("backbone.kwargs.output_view", "L"), ("method.nce_k", 6))
    method.bind_data(8, None)
    calls = []
    method.backbone.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    method.attach_online_classifier(torch.arange(8) % 2, 2, torch.Generator().manual_seed(0))
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    out = method([x], 0, torch.arange(8))
    assert calls == [(8, 96)]  # one call of the module: every view's vector (the loss needs both)
    assert method.online_classifier.in_features == 48 and "online_top1" in out.metrics  # L only, as kNN reads
    with torch.no_grad():
        method.eval()
        every = method.backbone(x, all_views=True)
        assert torch.equal(every, torch.cat(method.backbone.forward_views(x), 1))
        assert torch.equal(method.backbone(x), every[:, :48])


def test_half_width_resnets_as_the_official_resnet50v1() -> None:
    model = timm.create_model("cmc_resnet50", num_classes=0)
    for branch, chans in zip(model.branches, (1, 2), strict=True):
        assert branch.conv1.in_channels == chans and branch.conv1.out_channels == 64  # the stem stays 64 wide
        assert [getattr(branch, f"layer{i}")[-1].conv3.out_channels for i in range(1, 5)] == [128, 256, 512, 1024]
        assert all(torch.equal(bn.weight, torch.ones_like(bn.weight)) for bn in branch.modules()
                   if isinstance(bn, torch.nn.BatchNorm2d))  # fmt: skip
    assert model.view_widths == [1024, 1024] and model.num_features == 2048
    full = timm.create_model("cmc_resnet18", num_classes=0, width=1.0)
    assert full.branches[0].layer4[-1].conv2.out_channels == 512 and full.num_features == 1024


def test_the_output_is_every_views_vector_or_the_one_asked_for() -> None:
    torch.manual_seed(0)
    both = timm.create_model("cmc_test_resnet", num_classes=0).eval()
    only_l = timm.create_model("cmc_test_resnet", num_classes=0, output_view="L").eval()
    only_l.load_state_dict(both.state_dict())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pooled = both.forward_views(x)
        assert torch.equal(both(x), torch.cat(pooled, 1)) and both.num_features == 96
        assert torch.equal(only_l(x), pooled[0]) and only_l.num_features == 48
        assert torch.equal(both(x), both.forward_head(both.forward_features(x)))
    three = timm.create_model("cmc_test_resnet", num_classes=0, split="L,a,b", output_view="b")
    assert three.view_names == ["L", "a", "b"] and three.num_features == 48


def test_set_output_view_reselects_the_views_of_a_built_encoder() -> None:
    torch.manual_seed(0)
    model = timm.create_model("cmc_test_resnet", num_classes=0).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        pooled = model.forward_views(x)
        assert model.output_view == "all"
        model.set_output_view("ab")
        assert model.output_view == "ab" and model.num_features == model.head_hidden_size == 48
        assert torch.equal(model(x), pooled[1]) and isinstance(model.head, torch.nn.Identity)
        model.set_output_view("all")
        assert model.num_features == 96 and torch.equal(model(x), torch.cat(pooled, 1))
    with pytest.raises(ValueError, match=r"output_view 'Y': valid are all, L, ab"):
        model.set_output_view("Y")
    assert model.output_view == "all" and model.num_features == 96  # a refused view changes nothing
    classifier = timm.create_model("cmc_test_resnet", num_classes=10)
    classifier.set_output_view("L")
    assert classifier.head.in_features == 48 and classifier(x).shape == (2, 10)  # the head follows the width


def test_timm_registry_builds_the_encoders_with_timms_interface() -> None:
    assert set(timm.list_models("cmc_*")) == set(ENCODERS)
    model = timm.create_model("cmc_test_resnet")
    assert isinstance(model, CMCEncoder) and model.num_classes == 0 and model.pretrained_cfg["mean"] == (0, 0, 0)
    classifier = timm.create_model("cmc_test_resnet", num_classes=10)
    assert classifier(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    classifier.reset_classifier(0)
    assert classifier(torch.rand(2, 3, 32, 32)).shape == (2, 96)
    from timm.optim import param_groups_layer_decay

    assert len(param_groups_layer_decay(classifier, layer_decay=0.7)) > 2  # timm's layer groups (ssl transfer)
    stem = build_backbone(BackboneConfig(name="cmc_resnet18", small_stem=True))
    assert all(b.conv1.stride == (1, 1) and isinstance(b.maxpool, torch.nn.Identity) for b in stem.branches)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"space": "hsv"}, r"space 'hsv': valid are lab, ydbdr, ycbcr"),
        ({"split": "L,a"}, r"split 'L,a': at least 2 views that use each of L, a, b exactly once"),
        ({"split": "L,xy"}, r"'xy' is not made of the lab channels"),
        ({"output_view": "Y"}, r"output_view 'Y': valid are all, L, ab"),
        ({"branch": "resnet18"}, r"cmc_resnet50 has resnet50 per view"),
    ],
)
def test_bad_encoder_arguments_are_one_line(kwargs: dict, message: str) -> None:
    assert_one_line_error(message, build_backbone, BackboneConfig(name="cmc_resnet50", kwargs=kwargs))


# --- the loss against explicit loops ---------------------------------------------------------------------------


def dot(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v, strict=True))


def nce_by_hand(anchor, bank, idx, tau: float, n: int) -> tuple[float, float]:
    """NCE of one direction written out: P = exp(v . z / tau) / Z, Z = n * mean of exp over the first batch, loss
    = -(sum log P0 / (P0 + m/n) + sum log (m/n) / (Pj + m/n)) / B (NCECriterion without its eps)."""
    scores = [[math.exp(dot(bank[j], anchor[i]) / tau) for j in row] for i, row in enumerate(idx)]
    z = n * sum(map(sum, scores)) / sum(map(len, scores))
    m = len(idx[0]) - 1
    total = 0.0
    for row in scores:
        p = [s / z for s in row]
        total += math.log(p[0] / (p[0] + m / n)) + sum(math.log((m / n) / (pj + m / n)) for pj in p[1:])
    return -total / len(idx), z


def softmax_by_hand(anchor, bank, idx, tau: float) -> float:
    total = 0.0
    for i, row in enumerate(idx):
        logits = [dot(bank[j], anchor[i]) / tau for j in row]
        total += logits[0] - math.log(sum(math.exp(v) for v in logits))
    return -total / len(idx)


def infonce_by_hand(anchor, others, tau: float) -> float:
    total = 0.0
    for i, a in enumerate(anchor):
        logits = [dot(a, o) / tau for o in others]
        total += logits[i] - math.log(sum(math.exp(v) for v in logits))
    return -total / len(anchor)


def stepped_inputs(method, step: int = 3):
    """Random normalised embeddings per view, random banks (distinct per view) and the step's indices."""
    g = torch.Generator().manual_seed(4)
    n, batch = method.banks[0].size, 8
    for bank in method.banks:
        bank.features.copy_(F.normalize(torch.randn(n, method.embed_dim, generator=g), dim=1))
    z = [F.normalize(torch.randn(batch, method.embed_dim, generator=g), dim=1) for _ in method.view_names]
    index = torch.randperm(n, generator=g)[:batch]
    idx = torch.cat([index[:, None], method.noise(step, batch, torch.device("cpu"))], dim=1)
    return z, index, idx


@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_bank_terms_match_the_explicit_loops_each_anchor_against_the_other_views_bank(loss: str) -> None:
    method = tiny(
        ("method.loss", loss), ("method.nce_k", 6), ("method.temperature", 0.5), ("method.proj_output_dim", 4)
    )
    method.bind_data(20, None)
    z, index, idx = stepped_inputs(method)
    terms = method.bank_terms(z, index, 3)
    assert set(terms) == {(0, 1), (1, 0)}
    banks = [b.features.tolist() for b in method.banks]
    for a, b in ((0, 1), (1, 0)):
        if loss == "nce":
            want, z_ab = nce_by_hand(z[a].tolist(), banks[b], idx.tolist(), 0.5, 20)
            assert method.nce_z[a, b].item() == pytest.approx(z_ab, rel=1e-6)
            own, _ = nce_by_hand(z[a].tolist(), banks[a], idx.tolist(), 0.5, 20)
        else:
            want = softmax_by_hand(z[a].tolist(), banks[b], idx.tolist(), 0.5)
            own = softmax_by_hand(z[a].tolist(), banks[a], idx.tolist(), 0.5)
        assert terms[(a, b)].item() == pytest.approx(want, rel=1e-5)
        assert terms[(a, b)].item() != pytest.approx(own, rel=1e-3)  # not its own view's bank


def test_the_l_anchor_reads_only_the_ab_bank() -> None:
    method = tiny(("method.nce_k", 6), ("method.proj_output_dim", 4))
    method.bind_data(20, None)
    z, index, _ = stepped_inputs(method)
    before = method.bank_terms(z, index, 3)
    method.banks[0].features.copy_(F.normalize(torch.randn(20, 4, generator=torch.Generator().manual_seed(9)), dim=1))
    after = method.bank_terms(z, index, 3)  # Z is fixed from the first call: only the scores move
    assert after[(0, 1)].item() == before[(0, 1)].item()  # L against ab: the L bank plays no part
    assert after[(1, 0)].item() != pytest.approx(before[(1, 0)].item())


def test_z_is_set_by_the_first_batch_and_then_fixed() -> None:
    method = tiny(("method.nce_k", 6), ("method.proj_output_dim", 4))
    method.bind_data(20, None)
    z, index, _ = stepped_inputs(method)
    assert torch.equal(method.nce_z, torch.zeros(2, 2, dtype=torch.float64))
    method.bank_terms(z, index, 3)
    first = method.nce_z.clone()
    assert first[0, 1] > 0 and first[1, 0] > 0 and first[0, 1] != first[1, 0] and first[0, 0] == 0
    method.bank_terms([v.flip(0) for v in z], index, 4)
    assert torch.equal(method.nce_z, first)


def test_infonce_terms_match_the_explicit_loops() -> None:
    method = tiny(("method.loss", "infonce"), ("method.temperature", 0.3))
    method.bind_data(20, None)
    assert method.banks is None  # in-batch negatives: no bank
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    z = [v.detach() for v in method.embed(x)]
    out = method.training_step([x], 0)  # no dataset indices needed
    for (a, b), name in (((0, 1), "loss_L_ab"), ((1, 0), "loss_ab_L")):
        want = infonce_by_hand(z[a].tolist(), z[b].tolist(), 0.3)
        assert out.metrics[name].item() == pytest.approx(want, rel=1e-5)
    assert out.loss.item() == pytest.approx(out.metrics["loss_L_ab"].item() + out.metrics["loss_ab_L"].item())


def test_noise_is_drawn_for_the_global_batch(monkeypatch) -> None:
    method = tiny(("method.nce_k", 5))
    method.bind_data(30, None)
    one = assert_drawn_for_the_global_batch(monkeypatch, cmc_method, lambda step, n: method.noise(step, n, "cpu"))
    assert one.shape == (8, 5) and 0 <= one.min() and one.max() < 30


def test_bank_scores_run_in_fp32_under_bf16_autocast() -> None:
    method = tiny(("method.nce_k", 6), ("method.proj_output_dim", 4))
    method.bind_data(20, None)
    z, index, _ = stepped_inputs(method)
    z = [v.bfloat16() for v in z]  # what a bf16 head gives
    want = method.bank_terms([v.float() for v in z], index, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = method.bank_terms(z, index, 3)
    for pair in want:  # the bank and every product in fp32: a bf16 matmul would be off by ~1e-2 at tau 0.07
        assert got[pair].dtype == torch.float32
        assert got[pair].item() == pytest.approx(want[pair].item(), rel=1e-6)


# --- gradients and the bank update -------------------------------------------------------------------------------


def branch_grads(method, loss: torch.Tensor) -> list[bool]:
    params = [
        list(b.parameters()) + list(h.parameters())
        for b, h in zip(method.backbone.branches, method.projectors, strict=True)
    ]
    grads = torch.autograd.grad(loss, [p for ps in params for p in ps], retain_graph=True, allow_unused=True)
    it = iter(grads)
    return [any(g is not None and g.abs().sum() > 0 for g in [next(it) for _ in ps]) for ps in params]


def test_a_bank_term_trains_only_its_anchors_network_an_infonce_term_both() -> None:
    method = tiny(("method.nce_k", 6))
    method.bind_data(20, None)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    terms = method.bank_terms(method.embed(x), torch.arange(8), 0)
    assert branch_grads(method, terms[(0, 1)]) == [True, False]  # L scored against the ab bank: only L learns
    assert branch_grads(method, terms[(1, 0)]) == [False, True]
    assert all(not b.features.requires_grad for b in method.banks)
    method = tiny(("method.loss", "infonce"))
    z = method.embed(x)
    from ssl_cli.losses.cmc import cross_view_infonce

    assert branch_grads(method, cross_view_infonce(z[0], z[1], 0.07)) == [True, True]


@pytest.mark.parametrize("momentum", [0.5, 0.25])
def test_bank_update_step_by_step(momentum: float) -> None:
    method = tiny(("method.nce_k", 6), ("method.bank_momentum", momentum))
    method.bind_data(20, None)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    index = torch.tensor([3, 11, 0, 17])
    before = [b.features.clone() for b in method.banks]
    out = method.training_step([x], 0, index)
    assert all(torch.equal(b.features, old) for b, old in zip(method.banks, before, strict=True))  # not during the step
    z = [v.detach() for v in method.embed(x)]  # the same weights (no optimizer step here): the same embeddings
    pending = method._pending[1]
    assert all(not p.requires_grad for p in pending) and all(
        torch.allclose(p, v) for p, v in zip(pending, z, strict=True)
    )
    out.loss.backward()
    method.after_optimizer_step(0, 10)
    others = torch.tensor([i for i in range(20) if i not in index.tolist()])
    for bank, old, view in zip(method.banks, before, z, strict=True):  # the L bank takes the L embeddings
        want = F.normalize(momentum * old[index] + (1 - momentum) * view, dim=1)
        torch.testing.assert_close(bank.features[index], want)
        assert torch.equal(bank.features[others], old[others])  # only the batch's rows
        torch.testing.assert_close(bank.features[index].norm(dim=1), torch.ones(4))
    assert method._pending is None


# --- core view vs full graph ------------------------------------------------------------------------------------


def test_core_view_and_full_graph_pairs() -> None:
    assert cross_view_pairs(2, "core") == cross_view_pairs(2, "full") == [(0, 1), (1, 0)]
    assert sorted(cross_view_pairs(3, "core")) == [(0, 1), (0, 2), (1, 0), (2, 0)]
    assert sorted(cross_view_pairs(3, "full")) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    for m in (2, 3, 4, 5):
        assert len(cross_view_pairs(m, "core")) == 2 * (m - 1)
        assert len(cross_view_pairs(m, "full")) == m * (m - 1)


@pytest.mark.parametrize("pairs, want", [("core", {"L_a", "a_L", "L_b", "b_L"}),
                                         ("full", {"L_a", "a_L", "L_b", "b_L", "a_b", "b_a"})])  # fmt: skip
def test_three_views_train_the_pairs_of_the_objective(pairs: str, want: set[str]) -> None:
    method = tiny(("backbone.kwargs.split", "L,a,b"), ("method.pairs", pairs), ("method.nce_k", 6))
    method.bind_data(20, None)
    assert len(method.banks) == 3 and [b.conv1[0].in_channels for b in method.backbone.branches] == [1, 1, 1]
    out = method.training_step([torch.rand(8, 3, 32, 32)], 0, torch.arange(8))
    assert {k.removeprefix("loss_") for k in out.metrics} == want
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.metrics.values()), rel=1e-6)
    out.loss.backward()
    method.after_optimizer_step(0, 10)


# --- recipes and settings -----------------------------------------------------------------------------------


def test_bad_settings_are_one_line() -> None:
    def build(*overrides):
        return build_method(load_recipe("cmc", [*TINY, ("views.*.size", 32), *overrides]))

    assert_one_line_error(r"backbone.name: CMC needs one network per colour view, 'test_resnet'", build)
    assert_one_line_error(r"data.mean: cmc_test_resnet takes RGB in \[0, 1\]", build, *SMALL,
                          ("data.mean", [0.485, 0.456, 0.406]))  # fmt: skip
    method = tiny()
    with pytest.raises(Exception, match="bind_data"):
        method.training_step([torch.rand(2, 3, 32, 32)], 0, torch.arange(2))


def test_the_demo_settings_build_half_width_resnet18s_without_batch_statistics() -> None:
    from ssl_cli.train.launch import demo_overrides

    recipe = load_recipe("cmc-cifar", demo_overrides("cmc", load_recipe("cmc-cifar")))
    method = build_method(recipe)
    assert recipe.backbone.name == "cmc_resnet18" and recipe.method.nce_k == 1024 and recipe.views[0].size == 32
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in method.backbone.modules())


def test_the_cifar_recipe_is_the_main_one_at_32_px() -> None:
    main, cifar = load_recipe("cmc").to_dict(), load_recipe("cmc-cifar").to_dict()
    assert {k for k in main if main[k] != cifar[k]} == {"recipe", "backbone", "views", "train"}
    assert cifar["backbone"]["name"] == "cmc_resnet18" and cifar["backbone"]["small_stem"]
    assert cifar["views"][0]["size"] == 32 and cifar["method"] == main["method"]


# --- a tiny run through the toolkit -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("cmc")
    train = write_image_folder(root / "train", per_class=8, classes=2)
    val = write_image_folder(root / "val", per_class=4, classes=2, split="test")
    overrides = [*TINY, *SMALL_CIFAR, ("train.batch_size", 8), ("train.epochs", 2), ("method.nce_k", 8)]
    recipe = load_recipe("cmc-cifar", overrides)
    result = pretrain(recipe, str(train), root / "run", val=str(val))
    return SimpleNamespace(root=root, train=str(train), val=str(val), recipe=recipe, ckpt=Path(result.checkpoint))


def test_monitors_metrics_and_banks_are_logged_and_saved(run) -> None:
    records = [json.loads(line) for line in (run.ckpt.parents[1] / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_L_ab", "loss_ab_L", "online_top1", "knn_top1"} <= set(records[-1])
    model = read_checkpoint(run.ckpt).section("model")
    assert model["banks.0.features"].shape == model["banks.1.features"].shape == (16, 128)
    assert (model["nce_z"][0, 1] > 0).item() and (model["nce_z"][1, 0] > 0).item()


def test_the_export_loads_with_timm_and_load_backbone_with_the_same_features(run) -> None:
    out = run.root / "export" / "backbone.safetensors"
    summary = export_backbone(run.ckpt, out)
    assert summary["architecture"] == "cmc_test_resnet" and summary["num_features"] == 96
    config = json.loads(out.with_suffix(".json").read_text())
    assert config["timm_kwargs"] == {}  # the encoder's defaults: space lab, split L,ab, output_view all
    assert config["mean"] == [0.0, 0.0, 0.0] and config["std"] == [1.0, 1.0, 1.0]
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    from_timm = timm.create_model(
        "cmc_test_resnet", num_classes=0, pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
        **config["timm_kwargs"],
    ).eval()  # fmt: skip
    with torch.no_grad():
        features = from_timm(x)
        assert torch.equal(features, ssl_cli.load_backbone(str(run.ckpt))(x))
        assert torch.equal(features, ssl_cli.load_backbone(str(out))(x))
        assert not torch.allclose(features, timm.create_model("cmc_test_resnet", num_classes=0).eval()(x))
        only_l = timm.create_model("cmc_test_resnet", num_classes=0, pretrained=True, output_view="L",
                                   pretrained_cfg_overlay=dict(file=str(out))).eval()  # fmt: skip
        assert torch.equal(only_l(x), features[:, :48])  # one view's network from the same file
    hf = export_model(run.ckpt, run.root / "hf", "hf")
    assert hf["max_abs_diff"] == 0.0


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_and_inspect(run) -> None:
    assert_torchscript_export_and_inspect(run.ckpt, "cmc", "cmc_test_resnet", 96)


def test_ssl_export_says_how_to_load_the_encoder(run) -> None:
    result = invoke("export", run.ckpt, "--out", run.root / "cli" / "backbone.safetensors")
    assert result.exit_code == 0, result.stderr
    assert "load with import ssl_cli, then timm.create_model('cmc_test_resnet', num_classes=0, pretrained" in (
        result.stderr
    )


def train_features(checkpoint, run, **kwargs) -> torch.Tensor:
    """The --train features ``ssl knn`` reads (``setup`` + ``features``, as the command calls them)."""
    s = setup(str(checkpoint), run.train, run.val, "cpu", **kwargs)
    return features(s, s.train, batch_size=256, num_workers=0)[0]  # ssl knn's default batch


def test_an_output_view_evaluates_that_views_network_alone(run) -> None:
    every = train_features(run.ckpt, run)
    only_l = train_features(run.ckpt, run, output_view="L")
    only_ab = train_features(run.ckpt, run, output_view="ab")
    assert every.shape == (16, 96) and only_l.shape == only_ab.shape == (16, 48)
    assert torch.equal(only_l, every[:, :48]) and torch.equal(only_ab, every[:, 48:])  # split order: L, ab
    assert not torch.allclose(only_l, only_ab)
    assert torch.equal(train_features(run.ckpt, run, output_view="all"), every)
    model = ssl_cli.load_backbone(str(run.ckpt), output_view="L")
    assert model.output_view == "L" and model.num_features == 48


def test_knn_and_probe_with_an_output_view_and_the_cache_keyed_by_it(run, tmp_path: Path) -> None:
    common = [run.ckpt, "--train", run.train, "--val", run.val, "--cache-dir", tmp_path, "--json", *EVAL]
    args = [*common, "--k", "3"]
    every = invoke("knn", *args)
    assert "output_view" not in one_json(every) and "features: extracted" in every.stderr
    only_l = invoke("knn", *args, "--output-view", "L")
    assert one_json(only_l)["output_view"] == "L"
    assert "features: cached" not in only_l.stderr  # never the "all" entry, though the file is the same
    only_ab = invoke("knn", *args, "--output-view", "ab")
    assert "features: cached" not in only_ab.stderr
    entries = [load_file(str(f))["features"] for f in sorted(tmp_path.glob("*.safetensors"))]
    assert sorted(e.shape[1] for e in entries) == [48, 48, 48, 48, 96, 96]
    want = train_features(run.ckpt, run, output_view="L")  # what the L run stored is the L network's features
    assert sum(torch.equal(e, want) for e in entries) == 1
    again = invoke("knn", *args, "--output-view", "L")
    assert again.stderr.count("features: cached") == 2 and one_json(again) == one_json(only_l)
    s = setup(str(run.ckpt), run.train, run.val, "cpu", cache=FeatureCache(tmp_path), output_view="L")
    assert s.model_id["output_view"] == "L"
    probe = invoke("probe", *common, "--epochs", "1", "--output-view", "ab")
    assert probe.stderr.count("features: cached") == 2  # the ab run's entries, not the others
    probe = one_json(probe)
    assert probe["output_view"] == "ab" and 0 <= probe["top1"] <= 1


def test_an_export_with_an_output_view_gives_knns_features(run) -> None:
    out = run.root / "view" / "backbone.safetensors"
    result = invoke("export", run.ckpt, "--out", out, "--output-view", "L")
    assert result.exit_code == 0, result.stderr
    assert "timm.create_model('cmc_test_resnet', num_classes=0, output_view='L', pretrained=True" in result.stderr
    config = json.loads(out.with_suffix(".json").read_text())
    assert config["timm_kwargs"] == {"output_view": "L"} and config["num_features"] == 48
    knn_features = train_features(run.ckpt, run, output_view="L")
    assert torch.equal(train_features(out, run), knn_features)  # the file read back by load_backbone
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    from_timm = timm.create_model(
        "cmc_test_resnet", num_classes=0, pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
        **config["timm_kwargs"],
    ).eval()  # fmt: skip
    with torch.no_grad():
        assert torch.equal(from_timm(x), ssl_cli.load_backbone(str(out))(x))
        assert torch.equal(from_timm(x), ssl_cli.load_backbone(str(run.ckpt), output_view="L")(x))
        every = ssl_cli.load_backbone(str(out), output_view="all")  # the file still holds every view's network
        assert every.num_features == 96 and torch.equal(every(x), ssl_cli.load_backbone(str(run.ckpt))(x))
    args = ["--train", run.train, "--val", run.val, "--k", "3", "--json", "--no-cache", *EVAL]
    by_view = one_json(invoke("knn", run.ckpt, *args, "--output-view", "L"))
    from_export = one_json(invoke("knn", out, *args))
    assert by_view.pop("output_view") == "L" and from_export == by_view  # the same kNN on the same features
    hf = one_json(invoke("export", run.ckpt, "--out", run.root / "view-hf", "--output-view", "ab", "--json"))
    assert hf["num_features"] == 48 and hf["max_abs_diff"] == 0.0
    assert json.loads((run.root / "view-hf" / "config.json").read_text())["model_args"]["output_view"] == "ab"


def test_embed_neighbors_and_the_embedding_map_take_an_output_view(run, tmp_path: Path) -> None:
    def embed(name: str, *view: str) -> tuple[dict, torch.Tensor]:
        out = tmp_path / f"{name}.safetensors"
        summary = one_json(invoke("embed", run.ckpt, "--data", run.train, "--out", out, "--json",
                                  "--cache-dir", tmp_path / "cache", *EVAL, *view))  # fmt: skip
        return summary, load_file(str(out))["embeddings"]

    every, every_f = embed("all")
    only_l, l_f = embed("L", "--output-view", "L")
    assert "output_view" not in every and only_l["output_view"] == "L" and not only_l["cached"]  # keyed by view
    assert every_f.shape == (16, 96) and torch.equal(l_f, every_f[:, :48])  # the L network's half (split L, ab)
    assert embed("L-again", "--output-view", "L")[0]["cached"]
    grid = one_json(invoke("neighbors", run.ckpt, "--data", run.train, "--out", tmp_path / "n.png", "--json",
                           "--k", "3", "--num-queries", "2", "--output-view", "L", *EVAL))  # fmt: skip
    assert grid["output_view"] == "L"
    with safe_open(str(tmp_path / "L.safetensors"), "pt") as f:
        paths = json.loads(f.metadata()["paths"])
    unit = F.normalize(l_f, dim=1)

    def row(path: str) -> torch.Tensor:
        return unit[paths.index(Path(path).relative_to(run.train).as_posix())]

    for query in grid["queries"]:  # the similarities are the L features' cosines
        for hit in query["neighbors"]:
            assert hit["similarity"] == pytest.approx((row(query["path"]) @ row(hit["path"])).item(), abs=1e-4)
    pca = one_json(invoke("plot", "embedding", run.ckpt, "--data", run.train, "--out", tmp_path / "e.png",
                          "--method", "pca", "--json", "--output-view", "ab", *EVAL))  # fmt: skip
    assert pca["output_view"] == "ab" and pca["images"] == 16
    ab = F.normalize(every_f[:, 48:].double(), dim=1)  # the map's PCA is of the ab network's features
    variance = torch.linalg.svdvals(ab - ab.mean(0)) ** 2
    assert pca["explained_variance"] == pytest.approx((variance[:2] / variance.sum()).tolist(), abs=1e-4)
    user_error(invoke("plot", "embedding", tmp_path / "L.safetensors", "--out", tmp_path / "f.png",
                      "--output-view", "L"), "--output-view L", "ssl embed file")  # fmt: skip
    user_error(invoke("embed", run.ckpt, "--data", run.train, "--out", tmp_path / "bad.safetensors",
                      "--output-view", "Y", *EVAL), "--output-view Y", "valid are all, L, ab")  # fmt: skip
    assert not (tmp_path / "bad.safetensors").exists()


def test_a_bad_output_view_is_one_line(run, tmp_path: Path) -> None:
    other = tiny_checkpoint(tmp_path / "resnet.safetensors")
    args = ["--train", run.train, "--val", run.val, "--no-cache", *EVAL]
    user_error(invoke("knn", other, *args, "--output-view", "L"), "--output-view L", "test_resnet", "cmc_")
    user_error(invoke("probe", run.ckpt, *args, "--output-view", "Y"), "--output-view Y", "valid are all, L, ab")
    user_error(invoke("export", run.ckpt, "--out", tmp_path / "x.safetensors", "--output-view", "a"),
               "--output-view a", "has the views L, ab")  # fmt: skip
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(SSLError, match=r"--output-view Y: .* has the views L, ab; valid are all, L, ab$"):
        ssl_cli.load_backbone(str(run.ckpt), output_view="Y")
    no_views = r"--output-view all: .*resnet.safetensors holds test_resnet, which has no colour views"
    with pytest.raises(SSLError, match=no_views):
        export_model(other, tmp_path / "y.safetensors", output_view="all")


def test_bench_replays_the_crop(run) -> None:
    result = bench(run.recipe, run.train, steps=1, warmup_steps=1)
    assert result["views"] == [[3, 32, 32]] and result["step_images_per_second"] > 0


def test_the_ceiling_runs_every_views_network_whatever_the_encoder_outputs() -> None:
    """Training runs both colour views' networks (``all_views=True``) even when the encoder outputs one view's
    features: the ceiling replays the call as made, so its arithmetic is the same as with every view output."""
    flops = {}
    for view in ("all", "L"):
        recipe = load_recipe("cmc-cifar", [*TINY, *SMALL_CIFAR, ("train.batch_size", 8),
                                           ("backbone.kwargs.output_view", view)])  # fmt: skip
        torch.manual_seed(0)
        method = build_method(recipe).train()
        method.bind_data(16, None)
        views = [torch.rand(8, 3, 32, 32)]
        calls = record_encoder_calls(method, lambda m=method, v=views: m(v, 0, torch.arange(8)).loss.backward())
        assert [c.options for c in calls] == [(("all_views", True),)]
        flops[view] = count_flops(replay_step(method, calls, torch.device("cpu"), "fp32"))
    assert flops["L"] == flops["all"]


@pytest.mark.parametrize("augment", ["batch", "sample"])
def test_an_interrupted_and_resumed_run_ends_bit_identical(run, augment: str, tmp_path: Path) -> None:
    """The banks, Z and the noise draws resume exactly, on the whole-batch and the per-sample augmentation path."""
    overrides = [*TINY, *SMALL_CIFAR, ("train.batch_size", 8), ("train.epochs", 3), ("data.augment", augment)]
    assert_resume_is_bit_identical(load_recipe("cmc-cifar", [*overrides, ("method.nce_k", 8)]), run.train, tmp_path)
