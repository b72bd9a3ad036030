"""``ssl visualize``: the captured attention is softmax(q k^T * scale) of the last block, the pictures have the
promised layout and content, and every bad input is one error line (a ResNet, a broken checkpoint, no images)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import Result
from helpers import invoke as cli_invoke
from PIL import Image

from conftest import write_image_folder
from ssl_cli.artifacts.checkpoint import EXPORT_FORMAT
from ssl_cli.artifacts.safetensors_io import atomic_save
from ssl_cli.backbones import build_backbone
from ssl_cli.config import load_recipe
from ssl_cli.config.schema import BackboneConfig
from ssl_cli.export.backbone import export_backbone
from ssl_cli.plots.attention import (
    GAP,
    cls_attention,
    colorize,
    last_block_attention,
    mass_masks,
    panel_layout,
    scale01,
    upsample,
)
from ssl_cli.train.pretrain import pretrain

# A ViT-Tiny cut to 2 blocks, 4x4 patches of 8 pixels at 32x32 (3 heads of 64 dimensions)
VIT = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8}
HEADS, GRID, ZOOM = 3, (4, 4), 4  # the default zoom makes 32-pixel panels 128 pixels wide
TINY_VIT = [
    ("backbone.name", VIT["name"]),
    ("backbone.img_size", VIT["img_size"]),
    ("backbone.patch_size", VIT["patch_size"]),
    ("backbone.kwargs", {"depth": 2}),
    ("views.*.size", 32),
    ("method.proj_hidden_dim", 32),
    ("method.pred_hidden_dim", 32),
    ("method.proj_output_dim", 16),
    ("train.batch_size", 8),
    ("train.epochs", 1),
    ("train.device", "cpu"),
    ("schedule.warmup_epochs", 0),
    ("data.num_workers", 0),
]


def invoke(*args: str | Path) -> Result:
    return cli_invoke("visualize", *args)


def one_json(result: Result) -> dict:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert result.stdout.count("\n") == 1 and "Traceback" not in result.stderr
    return json.loads(result.stdout)


def user_error(result: Result, expected: str) -> None:
    """Exit 2, nothing on stdout, exactly one ``error:`` line on stderr containing ``expected``, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """A one-step MoCo v3 ViT run on 8 images of 2 classes, its export (with a projector layer), a ResNet-18."""
    root = tmp_path_factory.mktemp("visualize")
    data = write_image_folder(root / "data", per_class=4, classes=2)
    vit = Path(pretrain(load_recipe("mocov3-vit-cifar", TINY_VIT), str(data), root / "vit").checkpoint)
    export_backbone(vit, root / "vit_export" / "backbone.safetensors", projector_layers=1)  # backbone + head
    torch.manual_seed(0)
    resnet = build_backbone(BackboneConfig(name="resnet18"))
    meta = {
        "format": EXPORT_FORMAT,
        "backbone": {"name": "resnet18", "kwargs": {}},
        "preprocessing": {"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [3, 32, 32]},
    }
    atomic_save(resnet.state_dict(), meta, root / "resnet.safetensors")
    return SimpleNamespace(
        root=root,
        data=data,
        vit=vit,
        vit_export=root / "vit_export" / "backbone.safetensors",
        resnet=root / "resnet.safetensors",
    )


# --- capturing the attention ------------------------------------------------------------------------------


def _tiny_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(**VIT, kwargs={"depth": 2, **kwargs})).eval()


def _recomputed(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) from the last block's input, with that block's own qkv (and q/k norm) weights."""
    block = model.blocks[-1]
    seen = []
    handle = block.norm1.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        model(x)
    handle.remove()
    tokens = seen[-1]  # B x N x C: what the attention module receives
    b, n, _ = tokens.shape
    heads = block.attn.num_heads
    with torch.no_grad():
        qkv = tokens @ block.attn.qkv.weight.T
        if block.attn.qkv.bias is not None:
            qkv = qkv + block.attn.qkv.bias
        q, k, _ = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k = block.attn.q_norm(q), block.attn.k_norm(k)
        logits = torch.einsum("bhid,bhjd->bhij", q, k) / q.shape[-1] ** 0.5
    return logits.softmax(-1)


@pytest.mark.parametrize(
    "kwargs, size, prefix, grid",
    [
        ({}, 32, 1, (4, 4)),  # [CLS] + 16 patches
        ({"reg_tokens": 2, "qk_norm": True}, 32, 3, (4, 4)),  # [CLS] + 2 registers + 16 patches; q/k normalised
        ({"dynamic_img_size": True}, 48, 1, (6, 6)),  # another input size: the grid follows the input
    ],
)
def test_captured_attention_is_softmax_qk_and_rows_sum_to_one(kwargs, size, prefix, grid) -> None:
    model = _tiny_vit(**kwargs)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    attention = last_block_attention(model, x)

    n = prefix + grid[0] * grid[1]
    assert attention.shape == (2, HEADS, n, n)
    torch.testing.assert_close(attention, _recomputed(model, x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, HEADS, n), atol=1e-6, rtol=0)

    # the model is left as it was: fused attention back on (where it was), same outputs
    assert model.blocks[-1].attn.fused_attn == _tiny_vit(**kwargs).blocks[-1].attn.fused_attn
    assert not model.blocks[-1].attn.attn_drop._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)

    cls, found = cls_attention(model, x)  # row 0 over the patch tokens only, on the patch grid
    assert found == grid
    torch.testing.assert_close(cls, attention[:, :, 0, prefix:].reshape(2, HEADS, *grid))


def test_mass_masks_keep_the_top_share_of_the_attention_as_dino_does() -> None:
    row = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    assert mass_masks(row, 0.6).tolist() == [[False, True, False, True]]  # 0.5, then 0.3 crosses 0.6
    assert mass_masks(row, 0.5).tolist() == [[False, True, False, False]]
    assert mass_masks(row, 1.0).all()

    # against DINO's formulation: ascending sort, normalise, keep where the cumulative mass exceeds 1 - t
    a = torch.rand(6, 49, generator=torch.Generator().manual_seed(0))
    values, order = a.sort(-1)
    values = values / values.sum(-1, keepdim=True)
    keep = torch.zeros_like(a, dtype=torch.bool).scatter(-1, order, values.cumsum(-1) > 1 - 0.6)
    assert torch.equal(mass_masks(a, 0.6), keep)
    assert ((a * mass_masks(a, 0.6)).sum(-1) / a.sum(-1) >= 0.6).all()


def test_colour_map_and_per_map_scaling() -> None:
    rgb = colorize(np.linspace(0, 1, 101))
    assert rgb.dtype == np.uint8 and rgb.shape == (101, 3)
    assert rgb[0].tolist() == [68, 1, 84] and rgb[-1].tolist() == [253, 231, 37]  # viridis' ends
    luminance = rgb.astype(float) @ [0.2126, 0.7152, 0.0722]
    assert (np.diff(luminance) > 0).all()  # darker to brighter, step by step
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[7.0, 7.0], [7.0, 7.0]]])
    scaled = scale01(maps)
    assert scaled[0].tolist() == [[0.0, 0.5], [0.25, 1.0]] and scaled[1].eq(0).all()


# --- the command ------------------------------------------------------------------------------------------


def _pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def _panel(picture: np.ndarray, col: int, row: int = 0, size: int = 32 * ZOOM) -> np.ndarray:
    top, left = row * (size + GAP), col * (size + GAP)
    return picture[top : top + size, left : left + size]


def test_pngs_json_and_what_the_panels_show(world) -> None:
    result = invoke(world.vit, "--data", world.data, "--num-images", "3", "--json")
    payload = one_json(result)
    assert payload["heads"] == HEADS and payload["grid"] == list(GRID)
    out = world.vit.parent.parent / "attention"  # default: <run folder>/attention
    # the first three images in the folder's sorted order (class folders, then file names)
    assert [Path(p) for p in payload["images"]] == [
        out / "000_disc_000.png",
        out / "001_disc_001.png",
        out / "002_disc_002.png",
    ]
    assert all(f"wrote {p}" in result.stderr for p in payload["images"])

    width, height = panel_layout(32, HEADS, ZOOM, threshold=False)
    assert (width, height) == ((HEADS + 2) * 128 + (HEADS + 1) * GAP, 128)  # image, 3 heads, mean
    picture = _pixels(payload["images"][0])
    assert picture.shape == (height, width, 3)

    # panel 0 is the image itself (32x32: the evaluation crop leaves it untouched), each pixel zoomed 4x
    source = np.asarray(Image.open(world.data / "disc" / "000.png").convert("RGB"))
    assert np.array_equal(_panel(picture, 0), source.repeat(ZOOM, 0).repeat(ZOOM, 1))

    # panels 1..4: the heads' maps and their mean, from an independent run of the library on the same input
    from ssl_cli.artifacts.backbone import load_backbone

    model, meta = load_backbone(world.vit, with_meta=True)
    pre = meta["preprocessing"]
    x = (torch.from_numpy(source.copy()).permute(2, 0, 1).float() / 255 - torch.tensor(pre["mean"]).view(3, 1, 1)) / (
        torch.tensor(pre["std"]).view(3, 1, 1)
    )
    cls, _ = cls_attention(model, x[None])
    maps = torch.cat([cls[0], cls[0].mean(0, keepdim=True)])
    expected = colorize(scale01(upsample(maps, (8, 8), (32, 32))))
    for c in range(HEADS + 1):
        panel = _panel(picture, c + 1)
        assert np.array_equal(panel, expected[c].repeat(ZOOM, 0).repeat(ZOOM, 1)), c
        colours = {tuple(p) for p in panel.reshape(-1, 3)}
        assert (68, 1, 84) in colours and (253, 231, 37) in colours  # each map scaled to [0, 1] on its own
        assert len(colours) > 2
    assert (_pixels(payload["images"][0])[:, 128 : 128 + GAP] == 255).all()  # a white gap between panels

    # plain output: a summary table on stdout, the same files
    result = invoke(world.vit, "--data", world.data, "--num-images", "1", "--out", world.root / "plain")
    assert result.exit_code == 0 and "heads" in result.stdout and "4 x 4" in result.stdout
    assert (world.root / "plain" / "000_disc_000.png").is_file()


def test_an_export_one_image_another_size_and_the_threshold_view(world, tmp_path: Path) -> None:
    image = world.data / "disc" / "001.png"
    payload = one_json(
        invoke(world.vit_export, "--data", image, "--size", "48", "--threshold", "0.6", "--out", tmp_path, "--json")
    )
    assert payload["grid"] == [6, 6] and payload["heads"] == HEADS  # position embeddings resampled to 6 x 6
    assert payload["images"] == [str(tmp_path / "000_001.png")]
    zoom = 3  # 48-pixel panels, 3x: at least 128 pixels
    picture = _pixels(payload["images"][0])
    assert picture.shape[1::-1] == panel_layout(48, HEADS, zoom, threshold=True)
    assert picture.shape[:2] == (2 * 48 * zoom + GAP, (HEADS + 2) * 48 * zoom + (HEADS + 1) * GAP)
    assert (_panel(picture, 0, row=1, size=48 * zoom) == 255).all()  # nothing under the image
    image_panel = _panel(picture, 0, size=48 * zoom).astype(int)
    for c in range(1, HEADS + 2):  # the image, darkened outside the kept patches
        masked = _panel(picture, c, row=1, size=48 * zoom).astype(int)
        assert (masked <= image_panel).all() and (masked == image_panel).any() and (masked < image_panel).any()


def test_not_a_vit_and_other_bad_input_are_one_error_line(world, tmp_path: Path) -> None:
    user_error(
        invoke(world.resnet, "--data", world.data), "visualize: needs a ViT backbone, the checkpoint has resnet18"
    )
    user_error(invoke(tmp_path / "missing.safetensors", "--data", world.data), "checkpoint not found")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    user_error(invoke(broken, "--data", world.data), "not a readable safetensors file")
    (tmp_path / "empty").mkdir()
    user_error(invoke(world.vit, "--data", tmp_path / "empty"), "no images found")
    user_error(invoke(world.vit, "--data", tmp_path / "nowhere"), "data not found")
    user_error(invoke(world.vit, "--data", world.data, "--num-images", "0"), "--num-images 0: must be 1 or more")
    user_error(invoke(world.vit, "--data", world.data, "--threshold", "1.5"), "--threshold 1.5")
    user_error(invoke(world.vit, "--data", world.data, "--size", "30"), "vit_tiny_patch16_224's patch size 8")
    assert not (tmp_path / "attention").exists()
