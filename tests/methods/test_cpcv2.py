"""CPC v2 (Henaff et al. 2019, arXiv:1905.09272): the loss against a direct re-derivation, the context network's mask,
patch extraction against explicit slicing, gradients into the encoder, and break-it checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, assert_one_line_error, tiny_method
from ssl_cli.augment.patches import augment_patches, extract_patches, grid_size
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
        part = sum(info_nce_step(p(ctx) * loss.emb_scale, t, k) for p, k in zip(loss.predictors[d], loss.steps))
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
    out = augment_patches(patches, 0.5, 1.0, generator=g)
    kept = (out.abs().flatten(2).sum(2) > 0).sum(1)
    assert (kept == 1).all()  # two of three channels dropped in every patch
    same = torch.tensor([torch.allclose(out[i], patches[i] * (out[i] != 0)) for i in range(400)])
    assert 0.3 < same.float().mean() < 0.7  # about half the patches unflipped
    assert torch.equal(augment_patches(patches, 0.0, 0.0), patches)


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
    assert torch.equal(model(x), load_backbone(str(out)).eval()(x))
