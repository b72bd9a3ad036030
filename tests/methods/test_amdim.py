"""AMDIM: the loss term by term against a re-derivation with explicit loops, the encoder (no padding, maps of 7x7,
5x5 and 1x1), its timm registration and export, the stock-ResNet path, and a tiny run through the toolkit (resume,
monitors, bench, export, inspect).

The reference below is written from the paper and costs.py's description of the scores (arXiv:1906.00910, Sec. 3;
github.com/Philip-Bachman/amdim-public costs.py), with Python loops over sources, images and locations and nothing
of ``ssl_cli.losses.amdim``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from helpers import assert_resume_is_bit_identical, invoke, one_json, tiny_toolkit_run, user_error

import ssl_cli
import ssl_cli.methods.amdim as amdim_method
from conftest import TINY, assert_one_line_error
from ssl_cli.backbones import build_backbone
from ssl_cli.config import load_recipe
from ssl_cli.config.schema import BackboneConfig
from ssl_cli.encoders.amdim import ENCODERS, AMDIMEncoder, ConvReLU, ResNxN, RKHSHead
from ssl_cli.encoders.taps import map_taps
from ssl_cli.export.backbone import export_backbone
from ssl_cli.export.formats import export_model
from ssl_cli.losses.amdim import amdim_loss, nce_g2l, sample_locations
from ssl_cli.train.bench import bench
from ssl_cli.train.pretrain import build_method

# AMDIM's 32x32 encoder at a tiny width: the structure of the real one, fast enough for a few training steps
SMALL = [("backbone.name", "amdim_32"), ("backbone.kwargs.ndf", 8), ("backbone.kwargs.n_rkhs", 32)]
SMALL_KWARGS = {"ndf": 8, "n_rkhs": 32, "n_depth": 3}


# --- the loss against explicit loops ------------------------------------------------------------------------


def reference_direction(src: list, trg: list, tclip: float, reg: float) -> tuple[float, float]:
    """-mean NCE and the penalty of sources ``src[i][k]`` predicting targets ``trg[j][k][l]``, by loops."""
    n, d, locs = len(src), len(src[0]), len(trg[0][0])
    raw = [[[sum(src[i][k] * trg[j][k][p] for k in range(d)) / math.sqrt(d) for p in range(locs)] for j in range(n)]
           for i in range(n)]  # fmt: skip
    penalty = reg * sum(raw[i][j][p] ** 2 for i in range(n) for j in range(n) for p in range(locs)) / (n * n * locs)
    clipped = [[[tclip * math.tanh(raw[i][j][p] / tclip) for p in range(locs)] for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        # negatives: every location of every other image, none of image i's own
        negatives = sum(math.exp(clipped[i][j][p]) for j in range(n) if j != i for p in range(locs))
        for p in range(locs):  # each location of image i's own target map is a positive
            positive = clipped[i][i][p]
            total += positive - math.log(math.exp(positive) + negatives)
    return -total / (n * locs), penalty


def reference_terms(r1, r5, r7, locations, tclip: float, reg: float) -> dict[str, float]:
    """The three costs (each the mean of both directions) and the summed penalty, from nested lists."""

    def maps(t):  # N x D x H x W -> per image, per channel, the row-major list of locations
        return [[t[i, k].flatten().tolist() for k in range(t.shape[1])] for i in range(t.shape[0])]

    terms = {"g2l_1t5": 0.0, "g2l_1t7": 0.0, "g2l_5t5": 0.0, "lgt_reg": 0.0}
    for a, b in ((0, 1), (1, 0)):
        m5_a, m5_b, m7_b = maps(r5[a]), maps(r5[b]), maps(r7[b])
        # 5->5: one location of view a's own 5x5 map per image, the one drawn for that image
        src5 = [[m5_a[i][k][int(locations[a][i])] for k in range(len(m5_a[i]))] for i in range(len(m5_a))]
        for name, src, trg in (("g2l_1t5", r1[a].tolist(), m5_b), ("g2l_1t7", r1[a].tolist(), m7_b),
                               ("g2l_5t5", src5, m5_b)):  # fmt: skip
            term, penalty = reference_direction(src, trg, tclip, reg)
            terms[name] += 0.5 * term
            terms["lgt_reg"] += 0.5 * penalty
    terms["loss"] = terms["g2l_1t5"] + terms["g2l_1t7"] + terms["g2l_5t5"] + terms["lgt_reg"]
    return terms


def features(n: int = 4, d: int = 6, scale: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r1 = [scale * torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(2)]
    r5 = [scale * torch.randn(n, d, 5, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    r7 = [scale * torch.randn(n, d, 7, 7, generator=g, dtype=torch.float64) for _ in range(2)]
    locations = torch.randint(25, (2, n), generator=g)
    return r1, r5, r7, locations


@pytest.mark.parametrize(
    "scale, tclip",
    [(1.0, 20.0), (6.0, 2.0)],  # the second: raw scores far beyond the clip, so clip and penalty order matter
    ids=["unclipped", "clipped"],
)
def test_each_term_matches_the_explicit_loops(scale: float, tclip: float) -> None:
    r1, r5, r7, locations = features(scale=scale)
    got = amdim_loss(r1, r5, r7, locations, tclip=tclip, score_reg=0.05)
    want = reference_terms(r1, r5, r7, locations, tclip, 0.05)
    for name in ("g2l_1t5", "g2l_1t7", "g2l_5t5", "lgt_reg", "loss"):
        assert got[name].item() == pytest.approx(want[name], rel=1e-9, abs=1e-12), name


def test_the_penalty_is_taken_before_the_clip_and_the_loss_is_the_sum() -> None:
    r1, r5, r7, locations = features(scale=6.0)
    got = amdim_loss(r1, r5, r7, locations, tclip=2.0, score_reg=0.05)
    # before the clip the raw scores reach ~ 6^2 sqrt(6): a penalty on clipped scores (|c| <= 2) would be <= 0.2
    assert got["lgt_reg"].item() > 3 * 0.05 * 2.0**2
    assert got["loss"].item() == pytest.approx(sum(got[k].item() for k in ("g2l_1t5", "g2l_1t7", "g2l_5t5", "lgt_reg")))


def test_one_direction_against_a_hand_computed_case() -> None:
    """Two images, one dimension, two locations: the NCE written out by hand."""
    src = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    trg = torch.tensor([[[1.0, -1.0]], [[0.5, 3.0]]], dtype=torch.float64)  # 2 images x 1 x 2 locations
    loss, penalty = nce_g2l(src, trg, 0, tclip=1e9, score_reg=1.0)
    s = src[:, 0, None, None] * trg[None, :, 0, :]  # i x j x l
    lse = [math.log(math.exp(s[0, 1, 0]) + math.exp(s[0, 1, 1])), math.log(math.exp(s[1, 0, 0]) + math.exp(s[1, 0, 1]))]
    want = -sum(s[i, i, p] - math.log(math.exp(s[i, i, p]) + math.exp(lse[i])) for i in range(2) for p in range(2)) / 4
    assert loss.item() == pytest.approx(float(want), rel=1e-12)
    assert penalty.item() == pytest.approx(float(s.pow(2).mean()), rel=1e-12)


def test_the_5t5_source_is_one_location_per_image() -> None:
    maps = torch.arange(2 * 3 * 25, dtype=torch.float64).view(2, 3, 25)
    picked = sample_locations(maps, torch.tensor([7, 24]))
    assert torch.equal(picked, torch.stack([maps[0, :, 7], maps[1, :, 24]]))
    # the 5->5 term depends on the drawn locations, 1->5 and 1->7 do not
    r1, r5, r7, locations = features()
    a = amdim_loss(r1, r5, r7, locations)
    b = amdim_loss(r1, r5, r7, (locations + 1) % 25)
    assert a["g2l_1t5"].item() == b["g2l_1t5"].item() and a["g2l_1t7"].item() == b["g2l_1t7"].item()
    assert a["g2l_5t5"].item() != pytest.approx(b["g2l_5t5"].item())


def test_gradients_match_finite_differences_and_reach_every_input() -> None:
    r1, r5, r7, locations = features(n=3, d=4, scale=2.0)
    inputs = [t.clone().requires_grad_() for t in (*r1, *r5, *r7)]

    def f(*t):
        return amdim_loss(list(t[0:2]), list(t[2:4]), list(t[4:6]), locations, tclip=3.0, score_reg=0.05)["loss"]

    assert torch.autograd.gradcheck(f, inputs)
    f(*inputs).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in inputs)


def test_the_loss_runs_in_fp32_under_bf16_autocast() -> None:
    r1, r5, r7, locations = (*(list(map(lambda t: t.to(torch.bfloat16), x)) for x in features()[:3]), features()[3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = amdim_loss(r1, r5, r7, locations)
    assert out["loss"].dtype == torch.float32
    want = amdim_loss(*([t.float() for t in x] for x in (r1, r5, r7)), locations)["loss"]
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)


# --- the encoder ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, size, sides",
    [
        ("amdim_32", 32, [30, 30, 14, 7, 7, 5, 3, 1, 1]),
        ("amdim_64", 64, [62, 30, 14, 7, 7, 5, 3, 1, 1]),
        ("amdim_128", 128, [64, 62, 30, 14, 7, 7, 5, 3, 1, 1]),
    ],
)
def test_the_encoder_shrinks_without_padding_to_7_5_and_1(name: str, size: int, sides: list[int]) -> None:
    model = timm.create_model(name, num_classes=0, ndf=4, n_rkhs=64, n_depth=2).eval()
    h, got = torch.randn(2, 3, size, size), []
    for layer in model.layer_list:
        h = layer(h)
        got.append(h.shape[-1])
    assert got == sides
    assert all(conv.padding == (0, 0) for conv in model.modules() if isinstance(conv, torch.nn.Conv2d))
    # the only padding is the 128 px stem's 2-pixel reflection (the reference's Conv3x3(..., 5, 2, 2, 'reflect'))
    pads = [m.pad for m in model.modules() if isinstance(m, ConvReLU)]
    assert pads == ([2, 0] if size == 128 else [0])
    widths = [4, 8, 16] + ([32] if size > 32 else [])
    stage_widths = [i["num_chs"] for i in model.feature_info]
    assert [w for w in widths if w in stage_widths] == widths and stage_widths[-1] == 64
    with torch.no_grad():
        maps = timm.create_model(name, features_only=True, ndf=4, n_rkhs=64, n_depth=2).eval()(
            torch.randn(2, 3, size, size)
        )
    assert [m.shape[-1] for m in maps] == [7, 5, 1]
    with torch.no_grad():
        assert torch.equal(
            model(h.new_ones(2, 3, size, size)),
            model.forward_head(model.forward_features(h.new_ones(2, 3, size, size))),
        )


def test_the_encoder_starts_as_its_shortcuts_and_only_its_last_bn_is_on_by_default() -> None:
    model = timm.create_model("amdim_32", num_classes=0, ndf=4, n_rkhs=32)
    blocks = [m for m in model.modules() if isinstance(m, ResNxN)]
    assert len(blocks) == 1 + 4 * 3 + 1 and all(torch.count_nonzero(b.conv2.weight) == 0 for b in blocks)
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms == ["layer_list.8"]  # the reference's use_bn = 0: no unused BatchNorm parameters either
    with_bn = timm.create_model("amdim_32", num_classes=0, ndf=4, n_rkhs=32, use_bn=True)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in with_bn.modules()) == 1 + len(blocks) + 1
    head = RKHSHead(3, 5)
    assert torch.count_nonzero(head.conv2.weight) == 0
    assert torch.equal(head.shortcut.weight[:3, :, 0, 0].diagonal(), torch.ones(3))
    assert head.shortcut.weight[:, :, 0, 0].abs().fill_diagonal_(0).max() <= 0.01


def test_timm_registry_builds_the_encoders_with_timms_interface() -> None:
    assert set(timm.list_models("amdim_*")) == set(ENCODERS)
    model = timm.create_model("amdim_32", ndf=4, n_rkhs=32)
    assert isinstance(model, AMDIMEncoder) and model.num_features == 32 and model.num_classes == 0
    assert model.pretrained_cfg["input_size"] == (3, 32, 32) and model.pretrained_cfg["architecture"] == "amdim_32"
    classifier = timm.create_model("amdim_32", ndf=4, n_rkhs=32, num_classes=10)
    assert classifier(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    classifier.reset_classifier(0)
    assert classifier(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    assert timm.create_model("amdim_128", ndf=4, n_rkhs=32, n_depth=1).num_features == 32
    from timm.optim import param_groups_layer_decay

    assert len(param_groups_layer_decay(classifier, layer_decay=0.7)) > 2  # timm's layer groups (ssl transfer)


def test_bad_encoder_arguments_are_one_line() -> None:
    def build(kwargs):
        return build_backbone(BackboneConfig(name="amdim_32", kwargs=kwargs))

    assert_one_line_error(r"n_rkhs = 16 must be at least the last stage's width 32", build, {"ndf": 8, "n_rkhs": 16})
    assert_one_line_error(r"amdim_32 is the 32x32 encoder; for another input size use", build, {"encoder_size": 64})
    assert_one_line_error(r"must be positive", build, {"ndf": 0})


@pytest.mark.parametrize("first", ["ssl_cli", "timm"])
def test_import_ssl_cli_registers_the_encoders_in_either_order_without_loading_timm_itself(first: str) -> None:
    code = (
        "import sys; import ssl_cli; assert 'timm' not in sys.modules and 'torch' not in sys.modules; import timm; "
        if first == "ssl_cli"
        else "import timm, ssl_cli; "
    ) + "m = timm.create_model('amdim_32', ndf=4, n_rkhs=32); print(type(m).__name__, m.num_features)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["AMDIMEncoder", "32"], out.stderr


# --- the method: stock backbones, sources, recipes -----------------------------------------------------------


def test_a_stock_resnet_gives_the_maps_nearest_7x7_and_5x5() -> None:
    taps = map_taps(timm.create_model("resnet18", num_classes=0), 32, (7, 5))
    assert [(t.module, t.size, t.channels) for t in taps] == [("layer1", (8, 8), 64), ("layer2", (4, 4), 128)]
    taps = map_taps(timm.create_model("test_resnet", num_classes=0), 224, (7, 5))
    assert [(t.module, t.size) for t in taps] == [("layer4", (7, 7)), ("layer4", (7, 7))]
    # AMDIM's own encoder: exactly its last 7x7 and its 5x5 layer (the reference's dim2layer)
    taps = map_taps(timm.create_model("amdim_32", num_classes=0, ndf=4, n_rkhs=32), 32, (7, 5))
    assert [(t.module, t.size) for t in taps] == [("layer_list.4", (7, 7)), ("layer_list.5", (5, 5))]


def test_a_step_on_a_stock_resnet_trains_its_stages_and_the_heads() -> None:
    recipe = load_recipe(
        "amdim", [*TINY, ("backbone.name", "resnet18"), ("train.batch_size", 4), ("method.rkhs_dim", 48)]
    )
    torch.manual_seed(0)
    method = build_method(recipe).train()
    assert isinstance(method.rkhs_1, RKHSHead) and method.rkhs_dim == 48
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    out = method.training_step(views, 0, torch.arange(4))
    out.loss.backward()
    assert set(out.metrics) == {"g2l_1t5", "g2l_1t7", "g2l_5t5", "lgt_reg"}
    for name in (
        "backbone.conv1.weight",
        "backbone.layer1.0.bn2.weight",
        "backbone.layer4.1.bn2.weight",
        "rkhs_5.bn_out.weight",
    ):
        assert method.get_parameter(name).grad.abs().sum() > 0, name
    # the hooks that read the maps are gone after the step
    assert all(not m._forward_hooks for m in method.backbone.modules())


def test_source_locations_are_drawn_for_the_global_batch(monkeypatch) -> None:
    method = build_method(load_recipe("amdim", [*TINY, *SMALL, ("train.batch_size", 4)]))
    one = method.source_locations(7, 8, torch.device("cpu"))
    assert one.shape == (2, 8) and 0 <= one.min() and one.max() < 25
    assert torch.equal(one, method.source_locations(7, 8, torch.device("cpu")))  # a function of (seed, step)
    assert not torch.equal(one, method.source_locations(8, 8, torch.device("cpu")))
    monkeypatch.setattr(amdim_method, "world_size", lambda: 2)
    halves = []
    for r in (0, 1):
        monkeypatch.setattr(amdim_method, "rank", lambda r=r: r)
        halves.append(method.source_locations(7, 4, torch.device("cpu")))
    assert torch.equal(torch.cat(halves, dim=1), one)  # 2 processes x 4 images draw what 1 process x 8 draws


def test_bad_settings_are_one_line() -> None:
    def build(*overrides):
        return build_method(load_recipe("amdim", [*TINY, *overrides]))

    two_sizes = ("views", [{"count": 1, "size": 32}, {"count": 1, "size": 24}])
    assert_one_line_error(r"views: AMDIM needs both views at one size", build, two_sizes)
    assert_one_line_error(r"train.batch_size: AMDIM needs at least 2 images", build, ("train.batch_size", 1))
    vit = [("backbone.name", "vit_tiny_patch16_224"), ("backbone.img_size", 32), ("backbone.patch_size", 8)]
    assert_one_line_error(r"no layer with N x C x H x W feature maps", build, *vit, ("backbone.kwargs.depth", 1))
    assert_one_line_error(r"views.0.size: 8 px is too small for 'amdim_32'", build, *SMALL, ("views.*.size", 8))


def test_the_cifar_recipe_is_the_main_one_at_32_px() -> None:
    main, cifar = load_recipe("amdim").to_dict(), load_recipe("amdim-cifar").to_dict()
    assert {k for k in main if main[k] != cifar[k]} == {"recipe", "backbone", "data", "views", "schedule", "train"}
    assert cifar["backbone"]["name"] == "amdim_32" and cifar["views"][0]["size"] == 32
    assert cifar["optim"] == main["optim"] and cifar["method"] == main["method"]


# --- a tiny run through the toolkit -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    recipe = load_recipe("amdim-cifar", [*TINY, *SMALL, ("train.batch_size", 8), ("train.epochs", 2)])
    return tiny_toolkit_run(tmp_path_factory.mktemp("amdim"), recipe)


def test_monitors_and_metrics_are_logged(run) -> None:
    records = [json.loads(line) for line in (run.ckpt.parents[1] / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert {"g2l_1t5", "g2l_1t7", "g2l_5t5", "lgt_reg", "online_top1", "knn_top1"} <= set(last)


def test_the_export_loads_with_timm_and_load_backbone_with_the_same_features(run) -> None:
    out = run.root / "export" / "backbone.safetensors"
    summary = export_backbone(run.ckpt, out)
    assert summary["architecture"] == "amdim_32"
    config = json.loads(out.with_suffix(".json").read_text())
    assert config["timm_kwargs"] == {"ndf": 8, "n_rkhs": 32}
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    from_timm = timm.create_model(
        "amdim_32", num_classes=0, pretrained=True, pretrained_cfg_overlay=dict(file=str(out)), **config["timm_kwargs"]
    ).eval()
    with torch.no_grad():
        features = from_timm(x)
        assert torch.equal(features, ssl_cli.load_backbone(str(run.ckpt))(x))
        assert torch.equal(features, ssl_cli.load_backbone(str(out))(x))
        assert not torch.allclose(features, timm.create_model("amdim_32", num_classes=0, **SMALL_KWARGS).eval()(x))
    # timm's hub layout: the folder loads with local-dir: once ssl_cli is imported
    hf = export_model(run.ckpt, run.root / "hf", "hf")
    assert hf["max_abs_diff"] == 0.0
    with torch.no_grad():
        assert torch.equal(timm.create_model(f"local-dir:{run.root / 'hf'}", pretrained=True).eval()(x), features)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_and_inspect(run) -> None:
    ts = export_model(run.ckpt, run.root / "backbone.pt")
    assert ts["max_abs_diff"] <= ts["tolerance"]
    info = one_json(invoke("inspect", run.ckpt, "--json"))
    assert info["method"] == "amdim" and info["backbone"]["name"] == "amdim_32" and info["num_features"] == 32


def test_ssl_export_says_how_to_load_the_encoder(run) -> None:
    from ssl_cli.cli.export import OWN_ENCODER_PREFIXES

    assert all(name.startswith(OWN_ENCODER_PREFIXES) for name in ENCODERS)
    result = invoke("export", run.ckpt, "--out", run.root / "cli" / "backbone.safetensors")
    assert result.exit_code == 0, result.stderr
    hint = "load with import ssl_cli, then timm.create_model('amdim_32', num_classes=0, ndf=8, n_rkhs=32, pretrained"
    assert hint in result.stderr


def test_bench_replays_both_views(run) -> None:
    result = bench(run.recipe, run.train, steps=1, warmup_steps=1)
    assert result["views"] == [[3, 32, 32], [3, 32, 32]] and result["step_images_per_second"] > 0
    assert result["step_flops_vs_ceiling"] > 1.0  # the heads and the NCE scores add to the encoder's work


def test_an_interrupted_and_resumed_run_ends_bit_identical(run, tmp_path: Path) -> None:
    recipe = load_recipe("amdim-cifar", [*TINY, *SMALL, ("train.batch_size", 8), ("train.epochs", 3)])
    assert_resume_is_bit_identical(recipe, run.train, tmp_path)


def test_the_cli_trains_and_a_bad_backbone_is_one_line(run, tmp_path: Path) -> None:
    common = ["--data", run.train, "--batch-size", "8", "--device", "cpu", "--num-workers", "0"]
    small = [a for k, v in SMALL for a in ("--set", f"{k}={v}")]
    out = one_json(invoke("pretrain", "--recipe", "amdim-cifar", *common, *small, "--epochs", "1", "--out",
                          tmp_path / "ok", "--json"))  # fmt: skip
    assert Path(out["checkpoint"]).is_file() and math.isfinite(out["loss"])
    vit = ["--backbone", "vit_tiny_patch16_224", "--set", "backbone.img_size=32", "--set", "views.*.size=32"]
    result = invoke("pretrain", "--recipe", "amdim", *common, *vit, "--out", tmp_path / "vit")
    user_error(result, "AMDIM reads local feature maps of 'vit_tiny_patch16_224'")
