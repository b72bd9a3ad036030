"""CPC v2 (Henaff et al. 2019, arXiv:1905.09272): the loss against a direct re-derivation, the context network's mask,
patch extraction against explicit slicing, gradients into the encoder, and break-it checks; the paper's readout (the
mean of the pooled patch features over the grid) in every evaluation of a CPC v2 file: ``ssl knn`` / ``probe``
(``--random-init`` too), the feature cache, the exports, ``ssl inspect`` and the online kNN monitor."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, assert_one_line_error, tiny_method
from ssl_cli.augment.patches import apply_patch_augmentation, draw_patch_augmentation, extract_patches, grid_size
from ssl_cli.config import load_recipe
from ssl_cli.losses.cpc import ROTATIONS, ContextNetwork, CPCLoss, contexts_at_once, info_nce_step
from ssl_cli.train.pretrain import build_method


def _reference_info_nce(
    pred: torch.Tensor, targets: torch.Tensor, k: int, positive_twice: bool = False
) -> torch.Tensor:
    """InfoNCE written out cell by cell: every prediction against every target of every image and position
    (``positive_twice``: the broken variant whose candidates hold the positive a second time)."""
    b, d, h, w = targets.shape
    candidates = [(n, r, c) for n in range(b) for r in range(h) for c in range(w)]
    losses = []
    for n in range(b):
        for r in range(h - k):
            for c in range(w):
                scores = torch.stack([pred[n, :, r, c] @ targets[m, :, rr, cc] for m, rr, cc in candidates])
                positive = candidates.index((n, r + k, c))
                if positive_twice:
                    scores = torch.cat([scores, scores[positive : positive + 1]])
                losses.append(torch.logsumexp(scores, 0) - scores[positive])
    return torch.stack(losses).mean()


def test_info_nce_matches_a_cell_by_cell_rederivation() -> None:
    g = torch.Generator().manual_seed(0)
    pred, targets = torch.randn(2, 5, 4, 3, generator=g), torch.randn(2, 5, 4, 3, generator=g)
    for k in (1, 2, 3):
        assert torch.allclose(info_nce_step(pred, targets, k), _reference_info_nce(pred, targets, k), atol=1e-5)


def test_info_nce_breaks_when_the_positive_is_counted_twice() -> None:
    """The re-derivation tells the loss from one whose negatives hold the positive again."""
    g = torch.Generator().manual_seed(1)
    pred, targets = torch.randn(2, 5, 4, 3, generator=g), torch.randn(2, 5, 4, 3, generator=g)
    loss = info_nce_step(pred, targets, 2)
    assert torch.allclose(loss, _reference_info_nce(pred, targets, 2), atol=1e-5)
    assert not torch.allclose(loss, _reference_info_nce(pred, targets, 2, positive_twice=True), atol=1e-3)


def test_a_perfect_predictor_drives_the_loss_to_zero_and_a_blind_one_to_log_n() -> None:
    targets = F.normalize(torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(2)), dim=1)
    k = 2
    perfect = torch.zeros_like(targets)
    perfect[:, :, : 5 - k] = 50 * targets[:, :, k:]
    assert info_nce_step(perfect, targets, k) < 1e-3
    assert math.isclose(float(info_nce_step(torch.zeros_like(targets), targets, k)), math.log(2 * 25), rel_tol=1e-6)


def test_the_context_never_sees_its_own_rows_successors() -> None:
    """Changing any patch feature in rows > r leaves the context at rows <= r unchanged; a change in row r moves it."""
    torch.manual_seed(0)
    net = ContextNetwork(6, hidden=8, blocks=5).eval()
    x = torch.randn(2, 6, 7, 7)
    base = net(x)
    for r in range(6):
        y = x.clone()
        y[:, :, r + 1 :] += torch.randn_like(y[:, :, r + 1 :])
        assert torch.equal(net(y)[:, :, : r + 1], base[:, :, : r + 1]), r
    y = x.clone()
    y[:, :, 3, 2] += 1.0
    assert not torch.allclose(net(y)[:, :, 3], base[:, :, 3])


def test_break_it_an_unmasked_context_sees_the_rows_below() -> None:
    """The mask check catches a context whose vertical conv looks at its own row and the one below (no shift)."""
    torch.manual_seed(0)
    net = ContextNetwork(6, hidden=8, blocks=1).eval()
    block = net.blocks[0]
    x = torch.randn(1, 6, 5, 5)

    def unmasked(inp: torch.Tensor) -> torch.Tensor:  # the 2x1 conv padded below instead of above
        c = block.row(F.relu(block.reduce(inp)))
        c = F.relu(block.column(F.pad(c, (0, 0, 0, 1))))
        return F.relu(inp + block.expand(c))

    y = x.clone()
    y[:, :, 3] += 1.0
    assert not torch.allclose(unmasked(y)[:, :, 2], unmasked(x)[:, :, 2])
    assert torch.equal(net(y)[:, :, 2], net(x)[:, :, 2])


def test_the_directions_contexts_in_one_pass_are_each_networks_own() -> None:
    """The grouped pass gives each direction's network on its own grid, and the same gradients to each network's
    parameters and to the grids; with one network's weights swapped for another's it would not."""
    torch.manual_seed(0)
    nets = [ContextNetwork(6, hidden=4, blocks=2).double() for _ in range(4)]
    grids = [torch.randn(3, 6, 5, 5, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    at_once = contexts_at_once(nets, grids)
    one_by_one = [net(x) for net, x in zip(nets, grids, strict=True)]
    for a, b in zip(at_once, one_by_one, strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    weights = [torch.randn_like(c) for c in one_by_one]
    params = [p for net in nets for p in net.parameters()] + grids
    got = torch.autograd.grad(sum((c * w).sum() for c, w in zip(at_once, weights, strict=True)), params)
    want = torch.autograd.grad(sum((c * w).sum() for c, w in zip(one_by_one, weights, strict=True)), params)
    for g, h in zip(got, want, strict=True):
        assert torch.allclose(g, h, atol=1e-10)
    swapped = contexts_at_once([nets[1], nets[0], nets[2], nets[3]], grids)
    assert not torch.allclose(swapped[0], one_by_one[0])


def test_the_loss_is_the_same_with_a_grid_of_any_shape() -> None:
    """A square grid runs the directions in one pass, a non-square one network by network: both the same loss."""
    torch.manual_seed(0)
    loss = CPCLoss(8, target_dim=4, hidden=8, blocks=2, steps_to_ignore=0, steps_to_predict=2).double()
    square = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    total, parts = loss(square)
    by_network = 0.0
    for d in loss.directions:
        z = torch.rot90(square, ROTATIONS[d], dims=(2, 3))
        t = torch.rot90(loss.targets(square), ROTATIONS[d], dims=(2, 3))
        ctx = loss.context[d](z)
        part = sum(
            info_nce_step(p(ctx) * loss.emb_scale, t, k) for p, k in zip(loss.predictors[d], loss.steps, strict=True)
        )
        assert torch.allclose(parts[f"loss_{d}"], part, atol=1e-10), d
        by_network = by_network + part
    assert torch.allclose(total, by_network, atol=1e-10)
    assert torch.isfinite(loss(torch.randn(2, 8, 5, 4, dtype=torch.float64))[0])  # non-square: network by network


def test_every_direction_predicts_from_its_own_side() -> None:
    """Each direction's rotation puts the cells it predicts from before the cells it predicts: for ``right`` the left
    column comes first, for ``up`` the bottom row."""
    grid = torch.arange(9.0).reshape(1, 1, 3, 3)  # value = 3 row + column
    first_row = {d: torch.rot90(grid, k, dims=(2, 3))[0, 0, 0].tolist() for d, k in ROTATIONS.items()}
    assert first_row == {"down": [0, 1, 2], "up": [8, 7, 6], "right": [6, 3, 0], "left": [2, 5, 8]}


def test_break_it_one_direction_only_is_a_different_loss() -> None:
    torch.manual_seed(0)
    latents = torch.randn(2, 8, 5, 5)
    four = CPCLoss(8, target_dim=4, hidden=8, blocks=1, steps_to_ignore=0, steps_to_predict=2)
    one = CPCLoss(8, target_dim=4, hidden=8, blocks=1, steps_to_ignore=0, steps_to_predict=2, directions=("down",))
    one.load_state_dict(four.state_dict(), strict=False)
    loss4, parts4 = four(latents)
    loss1, parts1 = one(latents)
    assert set(parts4) == {"loss_down", "loss_up", "loss_right", "loss_left"} and set(parts1) == {"loss_down"}
    assert torch.allclose(loss1, parts4["loss_down"]) and loss4 > loss1 * 2


def test_patch_extraction_matches_explicit_slicing() -> None:
    images = torch.randn(2, 3, 32, 32)
    patches = extract_patches(images, 8, 4)
    assert patches.shape == (2, 7, 7, 3, 8, 8) and grid_size(32, 8, 4) == 7
    for i in range(7):
        for j in range(7):
            assert torch.equal(patches[:, i, j], images[:, :, 4 * i : 4 * i + 8, 4 * j : 4 * j + 8])
    assert grid_size(256, 64, 32) == 7 and grid_size(32, 8, 5) == 0 and grid_size(8, 16, 4) == 0


def test_patch_augmentation_flips_and_drops_channels_per_patch() -> None:
    patches = torch.randn(400, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = apply_patch_augmentation(patches, draw_patch_augmentation((400,), 0.5, 1.0, g))
    kept = (out.abs().flatten(2).sum(2) > 0).sum(1)
    assert (kept == 1).all()  # two of three channels dropped in every patch
    same = torch.tensor([torch.allclose(out[i], patches[i] * (out[i] != 0)) for i in range(400)])
    assert 0.3 < same.float().mean() < 0.7  # about half the patches unflipped
    assert torch.equal(apply_patch_augmentation(patches, draw_patch_augmentation((400,), 0.0, 0.0)), patches)


def test_patch_draws_are_the_global_batchs_rows_of_one_draw_per_step(monkeypatch) -> None:
    """Two processes of 3 images each draw what one process of 6 draws for the same images (rank r: images 3r..3r+2),
    patch-major; the same step draws again the same, another step not."""
    import ssl_cli.methods.cpcv2 as cpc_method

    m = tiny_method("cpcv2", ("train.batch_size", 6))
    g = m.grid * m.grid
    one = m.patch_draws(5, 6)
    assert one.flip.shape == (g, 6) and one.flip.float().mean().item() == pytest.approx(0.5, abs=0.25)
    for r in range(2):
        monkeypatch.setattr(cpc_method, "rank", lambda r=r: r)
        monkeypatch.setattr(cpc_method, "world_size", lambda: 2)
        part = m.patch_draws(5, 3)
        for name in ("flip", "drop", "keep"):
            assert torch.equal(getattr(part, name), getattr(one, name)[:, 3 * r : 3 * r + 3]), (r, name)
    monkeypatch.setattr(cpc_method, "world_size", lambda: 1)
    monkeypatch.setattr(cpc_method, "rank", lambda: 0)
    assert torch.equal(m.patch_draws(5, 6).keep, one.keep) and not torch.equal(m.patch_draws(6, 6).keep, one.keep)


def test_a_training_step_augments_patch_i_j_of_image_b_with_its_draw() -> None:
    """The step's patches are the images' grid cells, each flipped / colour-dropped as ``patch_draws`` says."""
    m = tiny_method("cpcv2", ("train.batch_size", 4))
    images = torch.randn(4, 3, 32, 32)
    seen = []
    m.backbone.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    m.patch_features(images, step=3)
    draws = m.patch_draws(3, 4)
    cells = extract_patches(images, m.patch, m.stride)  # B x G x G x C x p x p
    got = seen[0].reshape(m.grid, m.grid, 4, 3, m.patch, m.patch)
    for b in range(4):
        for i in range(m.grid):
            k = i * m.grid + (b % m.grid)
            want = cells[b, i, b % m.grid]
            if draws.flip[k, b]:
                want = want.flip(-1)
            if draws.drop[k, b]:
                want = want * torch.nn.functional.one_hot(draws.keep[k, b], 3).float()[:, None, None]
            assert torch.equal(got[i, b % m.grid, b], want), (b, i)


def test_gradients_reach_the_encoder_through_every_patch() -> None:
    m = tiny_method("cpcv2").train()
    images = torch.randn(4, 3, 32, 32, requires_grad=True)
    out = m.training_step([images], 0)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.backbone.parameters())
    assert next(m.backbone.parameters()).grad.abs().sum() > 0  # through the whole encoder, down to its first layer
    assert (images.grad.abs().sum(1) > 0).all()  # every pixel lies in some patch


def test_patches_share_no_statistics_in_the_encoder() -> None:
    """The layer-normed encoder gives a patch the same feature whichever other patches share its batch."""
    m = tiny_method("cpcv2").eval()
    x = torch.randn(6, 3, 8, 8)
    assert torch.allclose(m.backbone(x)[:2], m.backbone(x[:2]), atol=1e-5)


def test_feature_grid_is_each_patch_through_the_backbone() -> None:
    m = tiny_method("cpcv2").eval()
    images = torch.randn(2, 3, 32, 32)
    grid = m.patch_features(images)
    assert grid.shape == (2, m.feature_dim, 7, 7)
    assert torch.allclose(grid[1, :, 2, 5], m.backbone(images[1:2, :, 8:16, 20:28])[0], atol=1e-5)


def test_bad_grids_are_one_line_errors() -> None:
    def build(*overrides):
        return build_method(load_recipe("cpcv2", [*TINY, *overrides]))

    assert_one_line_error("method.grid: .* divisible by 8, got 36", build, ("views.*.size", 36))
    assert_one_line_error(
        "method.patch_size: 8-pixel patches 5 apart", build, ("method.patch_size", 8), ("method.patch_stride", 5)
    )
    assert_one_line_error("method.steps_to_predict: 7 rows ahead", build, ("method.steps_to_predict", 7))


@pytest.mark.parametrize(
    "key, value", [("method.steps_to_predict", 2), ("method.directions", []), ("method.patch_size", 8)]
)
def test_bad_settings_are_rejected_by_the_schema(key: str, value) -> None:
    from ssl_cli.errors import RecipeError

    with pytest.raises(RecipeError):
        load_recipe("cpcv2", [(key, value)])


def test_resumed_run_is_exact_and_the_export_loads_into_timm(tmp_path) -> None:
    """Per-patch augmentation draws from the global RNG, which the checkpoints carry: an interrupted and resumed run
    ends bit-identical. The online monitors run on the patch features; the export is a stock timm model built with
    the recipe's ``norm_layer``."""
    import timm
    from helpers import Interrupt

    from conftest import write_image_folder
    from ssl_cli import load_backbone
    from ssl_cli.artifacts.checkpoint import read_checkpoint
    from ssl_cli.export.backbone import export_backbone
    from ssl_cli.train.pretrain import pretrain

    data = str(write_image_folder(tmp_path / "data", per_class=8, classes=2))
    val = str(write_image_folder(tmp_path / "val", per_class=4, classes=2, split="test"))
    r = load_recipe("cpcv2", [*TINY, ("method.context_dim", 16), ("train.epochs", 3), ("train.batch_size", 8)])
    full = pretrain(r, data, tmp_path / "full", val=val)
    with pytest.raises(KeyboardInterrupt):
        pretrain(r, data, tmp_path / "cut", reporter=Interrupt(at=3), val=val)
    resumed = pretrain(r, data, tmp_path / "cut", resume=True, val=val)
    a, b = read_checkpoint(full.checkpoint).section("model"), read_checkpoint(resumed.checkpoint).section("model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = (tmp_path / "full/metrics.jsonl").read_text().splitlines()[-1]
    assert all(key in record for key in ("online_top1", "knn_top1", "loss_down", "loss_left"))

    out = tmp_path / "backbone.safetensors"
    export_backbone(full.checkpoint, out)
    model = timm.create_model(
        "test_resnet",
        num_classes=0,
        norm_layer="groupnorm1",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(out)},
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    loaded = load_backbone(str(out))  # the patch-grid readout around the same timm encoder
    assert torch.equal(model(x), loaded.encoder(x)) and torch.allclose(loaded(x), _grid_mean(model, x, 8, 4), atol=1e-5)


# --- the paper's readout: the mean of the pooled patch features over the grid --------------------------------------

CPC_RUN = [
    *TINY,
    ("method.grid", 3),  # 16 px patches 8 apart at 32 px, not the default 8 / 4: the recipe's grid must be read
    ("method.steps_to_ignore", 1),
    ("method.steps_to_predict", 2),
    ("method.context_dim", 16),
    ("train.batch_size", 8),
]


def _grid_mean(encoder: torch.nn.Module, x: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """The paper's feature written out: each patch cut by slicing, through ``encoder`` alone, averaged over the grid."""
    rows, cols = (x.shape[2] - patch) // stride + 1, (x.shape[3] - patch) // stride + 1
    with torch.no_grad():
        cells = [
            encoder(x[:, :, i * stride : i * stride + patch, j * stride : j * stride + patch])
            for i in range(rows)
            for j in range(cols)
        ]
    return torch.stack(cells).mean(0)


def _pixels(folder: str, meta: dict) -> torch.Tensor:
    """A folder's 32x32 images in ImageFolder order, normalised as the file's preprocessing says (no resize, no
    augmentation)."""
    import numpy as np
    from PIL import Image

    paths = sorted(Path(folder).rglob("*.png"))
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)) for p in paths])
    mean, std = (torch.tensor(meta["preprocessing"][k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    return (x.permute(0, 3, 1, 2) / 255 - mean) / std


def _encoder(ckpt: Path, random_init: bool = False) -> torch.nn.Module:
    """The run's timm encoder, built without ``load_backbone``: the method's backbone with the checkpoint's weights,
    or the architecture from torch seed 0 (``--random-init``)."""
    from ssl_cli.artifacts.checkpoint import read_checkpoint
    from ssl_cli.backbones import build_backbone

    loaded = read_checkpoint(ckpt)
    if random_init:
        torch.manual_seed(0)
        return build_backbone(loaded.recipe.backbone).eval()
    method = build_method(loaded.recipe)
    missing, _ = method.load_state_dict(loaded.section("model"), strict=False)  # online classifier: unexpected
    assert not missing
    return method.backbone.eval()


def _knn_features(ckpt: Path, run, split: str = "train", **kwargs) -> tuple[torch.Tensor, object]:
    """What ``ssl knn`` reads (``setup`` + ``features``, as the command calls them) and its setup."""
    from ssl_cli.eval.run import features, setup

    s = setup(str(ckpt), run.train, run.val, "cpu", **kwargs)
    return features(s, getattr(s, split), batch_size=256, num_workers=0)[0], s


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny CPC v2 run (3x3 grid of 16 px patches at 32 px) with the online monitors, 16 training images."""
    from helpers import tiny_toolkit_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return tiny_toolkit_run(tmp_path_factory.mktemp("cpc"), load_recipe("cpcv2", CPC_RUN))
    finally:
        torch.set_num_threads(threads)


def test_patch_grid_features_are_the_mean_of_each_patch_through_the_encoder_alone() -> None:
    from ssl_cli.encoders.patch_grid import PatchGridFeatures

    encoder = tiny_method("cpcv2").backbone.eval()
    model = PatchGridFeatures(encoder, 16, 8).eval()
    assert model.num_features == encoder.num_features and model.readout() == {"type": "patch_grid", "patch": 16,
                                                                              "stride": 8}  # fmt: skip
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        grid, got, whole = model.forward_features(x), model(x), encoder(x)
    assert grid.shape == (2, encoder.num_features, 3, 3)
    assert torch.allclose(grid[1, :, 2, 0], encoder(x[1:2, :, 16:32, 0:16])[0], atol=1e-5)
    assert torch.allclose(got, _grid_mean(encoder, x, 16, 8), atol=1e-5)
    assert not torch.allclose(got, whole, atol=1e-2)  # not the whole image's pooled map
    # another input size: the same patches, as many rows and columns as fit (here 4 x 2)
    other = torch.randn(1, 3, 40, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert model.forward_features(other).shape[2:] == (4, 2)
        assert torch.allclose(model(other), _grid_mean(encoder, other, 16, 8), atol=1e-5)
    for bad in ((33, 32), (32, 12)):  # a border the grid does not cover; a side shorter than a patch
        assert_one_line_error(
            "not covered by 16 px patches 8 apart; give sides of 16 \\+ n x 8 px",
            model,
            torch.randn(1, 3, *bad),
            error=ValueError,
        )


def test_the_grid_lives_in_the_encoders_layer() -> None:
    """``ssl_cli.encoders`` imports nothing above it; ``ssl_cli.augment.patches`` re-exports the grid from it."""
    import re

    import ssl_cli.augment.patches as augment_patches_module
    import ssl_cli.encoders.patch_grid as patch_grid

    assert augment_patches_module.extract_patches is patch_grid.extract_patches
    assert augment_patches_module.grid_size is patch_grid.grid_size
    for source in Path(patch_grid.__file__).parent.glob("*.py"):
        assert not re.findall(r"^\s*(?:from|import) ssl_cli\.(?!encoders\b)", source.read_text(), re.M), source


def _cpc_meta(fmt: str = "ssl-checkpoint/1", **method) -> dict:
    recipe = {"method": {"name": "cpcv2", "grid": 7, "patch_size": None, "patch_stride": None, **method},
              "views": [{"size": 32}]}  # fmt: skip
    meta = {"format": fmt, "preprocessing": {"input_size": [3, 32, 32]}, "backbone": {"name": "test_resnet"}}
    return {**meta, "recipe": recipe} if fmt == "ssl-checkpoint/1" else {**meta, "source": {"recipe": recipe}}


@pytest.mark.parametrize(
    "overrides, want",
    [
        ((), (8, 4, 7)),
        ((("method.grid", 3), ("method.steps_to_ignore", 1), ("method.steps_to_predict", 2)), (16, 8, 3)),
        ((("method.patch_size", 8), ("method.patch_stride", 8)), (8, 8, 4)),
    ],
)
def test_the_readout_is_the_training_grid_of_the_recipe(overrides, want) -> None:
    """The grid ``load_backbone`` derives from a checkpoint's recipe is the one the method trained on."""
    from ssl_cli.artifacts.readout import readout_of

    m = tiny_method("cpcv2", *overrides)
    meta = {"format": "ssl-checkpoint/1", "recipe": m.recipe.to_dict(), "preprocessing": {"input_size": [3, 32, 32]}}
    assert readout_of(meta) == {"type": "patch_grid", "patch": want[0], "stride": want[1], "grid": want[2]}
    assert (m.patch, m.stride, m.grid) == want
    assert m.feature_model().readout() == {"type": "patch_grid", "patch": want[0], "stride": want[1]}


def test_readout_of_reads_the_recorded_grid_first_and_refuses_a_grid_that_does_not_fit() -> None:
    from ssl_cli.artifacts.metadata import check_metadata
    from ssl_cli.artifacts.readout import readout_of
    from ssl_cli.errors import CheckpointError

    assert readout_of(_cpc_meta(grid=3))["patch"] == 16
    assert readout_of(_cpc_meta("ssl-backbone/1", grid=3))["patch"] == 16  # an older export: its source recipe
    recorded = {**_cpc_meta("ssl-backbone/1", grid=3), "readout": {"type": "patch_grid", "patch": 8, "stride": 8}}
    assert readout_of(recorded) == {"type": "patch_grid", "patch": 8, "stride": 8, "grid": 4}
    simclr = _cpc_meta()
    simclr["recipe"]["method"]["name"] = "simclr"
    assert readout_of(simclr) is None and readout_of({"format": "ssl-backbone/1"}) is None
    assert_one_line_error("f.safetensors: metadata recipe: cannot tell the CPC v2 patch grid", readout_of,
                          _cpc_meta(grid=5), "f.safetensors", error=CheckpointError)  # fmt: skip
    recorded["readout"] = {"type": "patch_grid", "patch": 16, "stride": 5}
    assert_one_line_error("metadata readout: 16 px patches 5 apart do not cover the 32 px input", readout_of,
                          recorded, error=CheckpointError)  # fmt: skip
    recorded["readout"] = {"type": "image_crops", "patch": 16, "stride": 8}
    assert_one_line_error("metadata readout.type", check_metadata, recorded, "f", error=CheckpointError)


def test_knn_reads_the_mean_of_the_trained_encoders_patch_features(run) -> None:
    from helpers import EVAL, invoke, one_json

    import ssl_cli
    from ssl_cli.encoders.patch_grid import PatchGridFeatures

    got, s = _knn_features(run.ckpt, run)
    assert isinstance(s.model, PatchGridFeatures) and s.meta["readout"] == {"type": "patch_grid", "patch": 16,
                                                                            "stride": 8, "grid": 3}  # fmt: skip
    encoder, x = _encoder(run.ckpt), _pixels(run.train, s.meta)
    assert torch.allclose(got, _grid_mean(encoder, x, 16, 8), atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(got, encoder(x), atol=1e-2)  # the whole image through the encoder: another feature
        assert torch.allclose(ssl_cli.load_backbone(str(run.ckpt))(x), got, atol=1e-5)
    result = one_json(invoke("knn", run.ckpt, "--train", run.train, "--val", run.val, "--k", "3", "--json",
                             "--no-cache", *EVAL))  # fmt: skip
    assert result["readout"] == s.meta["readout"]


def test_random_init_reads_the_same_grid(run) -> None:
    from ssl_cli.encoders.patch_grid import PatchGridFeatures

    got, s = _knn_features(run.ckpt, run, random_init=True)
    assert isinstance(s.model, PatchGridFeatures) and s.meta["readout"]["patch"] == 16
    encoder, x = _encoder(run.ckpt, random_init=True), _pixels(run.train, s.meta)
    assert torch.allclose(got, _grid_mean(encoder, x, 16, 8), atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(got, encoder(x), atol=1e-2)
    assert not torch.allclose(got, _knn_features(run.ckpt, run)[0], atol=1e-2)  # random weights, not the trained


def test_the_cache_never_serves_a_whole_image_entry_of_the_same_file(run, tmp_path: Path) -> None:
    """An entry ``ssl knn`` wrote before CPC v2 files were read by their grid (the same file, its whole-image features)
    sits under the key without a readout: the grid's features are extracted, not read from it."""
    from ssl_cli.data import scan_folder
    from ssl_cli.eval.cache import FeatureCache, feature_key, file_digest, images_fingerprint
    from ssl_cli.eval.run import setup

    cache = FeatureCache(tmp_path)
    s = setup(str(run.ckpt), run.train, run.val, "cpu", cache=cache)  # nothing extracted yet
    legacy = {"checkpoint_sha256": file_digest(run.ckpt), "random_init": False}  # the key's model before
    assert s.model_id == {**legacy, "readout": s.meta["readout"]}
    pre = {"size": s.size, "mean": s.mean, "std": s.std}
    x = _pixels(run.train, s.meta)
    with torch.no_grad():
        whole = _encoder(run.ckpt)(x)
    cache.save(feature_key(legacy, pre, images_fingerprint(scan_folder(Path(run.train)))), whole, s.train.labels, {})
    got, s = _knn_features(run.ckpt, run, cache=cache)
    assert s.cached["train"] is False and torch.allclose(got, _grid_mean(_encoder(run.ckpt), x, 16, 8), atol=1e-5)
    again, s = _knn_features(run.ckpt, run, cache=cache)
    assert s.cached["train"] is True and torch.equal(again, got)  # the grid's own entry
    random_init = _knn_features(run.ckpt, run, cache=cache, random_init=True)[1]
    assert random_init.model_id["readout"] == s.meta["readout"] and random_init.cached["train"] is False


def test_the_online_knn_monitor_reads_what_ssl_knn_reads(run, monkeypatch) -> None:
    """The monitor's features of the training images, with the checkpoint's weights, are ``ssl knn``'s."""
    import ssl_cli.train.monitors as monitors
    from ssl_cli.artifacts.checkpoint import read_checkpoint
    from ssl_cli.data import open_dataset

    loaded = read_checkpoint(run.ckpt)
    method = build_method(loaded.recipe)
    method.load_state_dict(loaded.section("model"), strict=False)
    seen = {}
    knn = monitors.knn_classify

    def spy(train_f, *args, **kwargs):
        seen["train"] = train_f
        return knn(train_f, *args, **kwargs)

    monkeypatch.setattr(monitors, "knn_classify", spy)
    train, val = open_dataset(run.train), open_dataset(run.val, role="eval")
    record = monitors.OnlineMonitors(loaded.recipe, train, val).evaluate(method.train(), torch.device("cpu"))
    assert 0 <= record["knn_top1"] <= 1 and method.training  # the method back in training mode
    assert torch.allclose(seen["train"], _knn_features(run.ckpt, run)[0], atol=1e-5)


def test_the_export_records_the_grid_and_keeps_timms_weights(run, tmp_path: Path) -> None:
    import json

    import timm
    from helpers import invoke, one_json, wide_invoke

    import ssl_cli
    from ssl_cli.encoders.patch_grid import PatchGridFeatures

    out = tmp_path / "backbone.safetensors"
    result = wide_invoke("export", run.ckpt, "--out", out)
    assert result.exit_code == 0, result.stderr
    hint = " ".join(result.stderr.split())
    assert "norm_layer='groupnorm1'" in hint and "the encoder of one 16 px patch" in hint
    assert f"3x3 grid of 16 px patches 8 apart: ssl_cli.load_backbone('{out}')" in hint
    config = json.loads(out.with_suffix(".json").read_text())
    readout = {"type": "patch_grid", "patch": 16, "stride": 8, "grid": 3}
    assert config["readout"] == readout and "timm.create_model loads it" in config["readout_change"]
    encoder = _encoder(run.ckpt)
    from_timm = timm.create_model("test_resnet", num_classes=0, norm_layer="groupnorm1", pretrained=True,
                                  pretrained_cfg_overlay={"file": str(out)}).eval()  # fmt: skip
    reloaded, meta = ssl_cli.artifacts.backbone.load_backbone(out, with_meta=True)
    assert isinstance(reloaded, PatchGridFeatures) and meta["readout"] == readout
    assert set(reloaded.encoder.state_dict()) == set(from_timm.state_dict())
    x = _pixels(run.val, meta)
    with torch.no_grad():
        assert torch.equal(from_timm(x), encoder(x)) and torch.equal(reloaded.encoder(x), encoder(x))
        assert torch.equal(reloaded(x), ssl_cli.load_backbone(str(run.ckpt))(x))
    assert torch.equal(_knn_features(out, run)[0], _knn_features(run.ckpt, run)[0])
    for path in (run.ckpt, out):  # ssl inspect says how an image becomes its feature
        assert one_json(invoke("inspect", path, "--json"))["readout"] == readout
        table = " ".join(wide_invoke("inspect", path).stdout.replace("│", " ").split())
        assert "image feature the mean of the encoder's pooled features over a 3x3 grid of 16 px patches 8" in table


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "hf"])
def test_the_other_formats_export_the_readout(run, tmp_path: Path, fmt: str) -> None:
    """TorchScript and ONNX hold the whole readout (the grid cut inside); an hf folder holds the patch encoder for timm
    and the grid for ``ssl_cli.load_backbone``."""
    import timm

    import ssl_cli
    from ssl_cli.export.formats import export_model

    out = tmp_path / {"torchscript": "b.pt", "onnx": "b.onnx", "hf": "hf"}[fmt]
    summary = export_model(run.ckpt, out)
    assert summary["readout"]["patch"] == 16 and summary["max_abs_diff"] <= summary["tolerance"]
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    reference = ssl_cli.load_backbone(str(run.ckpt))
    with torch.no_grad():
        want = reference(x)
        if fmt == "torchscript":
            got = torch.jit.load(str(out))(x)
        elif fmt == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        else:
            assert summary["readout_check"]["max_abs_diff"] <= summary["readout_check"]["tolerance"]
            from_timm = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
            assert torch.equal(from_timm(x), reference.encoder(x))  # timm: the patch encoder
            got = ssl_cli.load_backbone(str(out))(x)
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-4
    from helpers import invoke, one_json

    assert one_json(invoke("inspect", out, "--json"))["readout"] == summary["readout"]  # ssl inspect says so too
