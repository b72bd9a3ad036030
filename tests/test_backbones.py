"""Backbones: stock timm models with num_classes=0, the CIFAR small stem and the frozen ViT patch projection."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from ssl_cli.backbones import build_backbone, patch_embed_params, timm_kwargs
from ssl_cli.config.schema import BackboneConfig
from ssl_cli.errors import RecipeError


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_convnext", "test_efficientnet", "resnet18"])
def test_pooled_features(name: str):
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(name=name)).eval()
    assert model.num_classes == 0
    assert isinstance(model.get_classifier(), nn.Identity)
    size = 160 if name == "test_vit" else 64
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert tuple(out.shape) == (2, model.num_features)
    stock = timm.create_model(name, num_classes=0)
    assert model.state_dict().keys() == stock.state_dict().keys()


def test_timm_kwargs_passed_through():
    cfg = BackboneConfig(name="resnet18", drop_path_rate=0.1, kwargs={"global_pool": "max"})
    assert timm_kwargs(cfg) == {"drop_path_rate": 0.1, "global_pool": "max"}
    model = build_backbone(cfg)
    assert model.global_pool.pool_type == "max"


def test_bad_kwargs_is_recipe_error():
    with pytest.raises(RecipeError, match="resnet18"):
        build_backbone(BackboneConfig(name="resnet18", kwargs={"no_such_option": 3}))


@pytest.mark.parametrize(
    ("name", "suggested"),
    [("vit_tiny_patch16", "vit_tiny_patch16_224"), ("resnet1", "resnet18"), ("resnt18", "resnet18")],
)
def test_unknown_name_suggests(name: str, suggested: str):
    with pytest.raises(RecipeError) as e:
        build_backbone(BackboneConfig(name=name))
    msg = str(e.value)
    assert "backbone.name" in msg and repr(name) in msg
    assert suggested in msg.split("similar:", 1)[1]
    assert "\n" not in msg


def test_unknown_name_without_anything_close():
    with pytest.raises(RecipeError, match="list_models"):
        build_backbone(BackboneConfig(name="qqqqqqqqqqqqqqqqqqqq"))


def test_small_stem_resnet18():
    stock = build_backbone(BackboneConfig(name="resnet18")).eval()
    model = build_backbone(BackboneConfig(name="resnet18", small_stem=True)).eval()
    conv1 = model.conv1
    assert isinstance(conv1, nn.Conv2d)
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1) and conv1.padding == (1, 1)
    assert conv1.in_channels == 3 and conv1.out_channels == stock.conv1.out_channels and conv1.bias is None
    assert isinstance(model.maxpool, nn.Identity)
    assert model.state_dict().keys() == stock.state_dict().keys()
    assert tuple(model.state_dict()["conv1.weight"].shape) == (64, 3, 3, 3)

    stem_out: dict[str, torch.Size] = {}

    def record(key: str):
        def hook(module, inputs, output) -> None:
            stem_out[key] = output.shape

        return hook

    model.bn1.register_forward_hook(record("bn1"))
    model.maxpool.register_forward_hook(record("pool"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert tuple(model.forward_features(x).shape) == (2, 512, 4, 4)
        assert tuple(stock.forward_features(x).shape) == (2, 512, 1, 1)
        assert tuple(model(x).shape) == (2, 512)
    assert tuple(stem_out["bn1"][-2:]) == (32, 32) and tuple(stem_out["pool"][-2:]) == (32, 32)
    # timm's metadata follows: the stem no longer downsamples
    assert [info["reduction"] for info in model.feature_info][:2] == [1, 1]


def test_small_stem_weights_load_into_rebuilt_model():
    a = build_backbone(BackboneConfig(name="resnet18", small_stem=True))
    b = build_backbone(BackboneConfig(name="resnet18", small_stem=True))
    b.load_state_dict(a.state_dict())  # strict: same keys and shapes
    with pytest.raises(RuntimeError):
        build_backbone(BackboneConfig(name="resnet18")).load_state_dict(a.state_dict())


@pytest.mark.parametrize("name", ["test_vit", "resnet18d", "test_convnext"])
def test_small_stem_rejected_without_plain_stem(name: str):
    with pytest.raises(RecipeError) as e:
        build_backbone(BackboneConfig(name=name, small_stem=True))
    assert "small_stem" in str(e.value) and name in str(e.value)


VIT = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=4)


def test_vit_img_and_patch_size():
    model = build_backbone(BackboneConfig(**VIT)).eval()
    assert model.patch_embed.num_patches == 64
    assert tuple(model.patch_embed.proj.kernel_size) == (4, 4) and tuple(model.patch_embed.proj.stride) == (4, 4)
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(2, 3, 32, 32))
        assert tokens.shape[:2] == (2, 64 + model.num_prefix_tokens)
        assert tuple(model(torch.randn(2, 3, 32, 32)).shape) == (2, model.num_features)
    assert model.num_features == 192


def test_vit_frozen_patch_embed_stays_fixed():
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(**VIT, freeze_patch_embed=True))
    proj = model.patch_embed.proj
    frozen = patch_embed_params(model)
    assert {id(p) for p in frozen} == {id(proj.weight), id(proj.bias)}
    assert not any(p.requires_grad for p in frozen)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(list(model.parameters())) - len(frozen)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        loss = model(torch.randn(4, 3, 32, 32)).pow(2).mean()
        loss.backward()
        opt.step()
    assert proj.weight.grad is None and proj.bias.grad is None
    assert torch.equal(proj.weight, before["patch_embed.proj.weight"])
    assert torch.equal(proj.bias, before["patch_embed.proj.bias"])
    for name in ("blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.weight", "pos_embed", "cls_token"):
        assert not torch.equal(dict(model.named_parameters())[name], before[name]), name


def test_vit_unfrozen_patch_embed_trains():
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(name="test_vit", img_size=32, patch_size=8))
    assert all(p.requires_grad for p in model.parameters())
    model(torch.randn(2, 3, 32, 32)).pow(2).mean().backward()
    assert model.patch_embed.proj.weight.grad is not None


@pytest.mark.parametrize("name", ["resnet18", "test_resnet"])
def test_freeze_patch_embed_rejected_on_resnet(name: str):
    assert patch_embed_params(build_backbone(BackboneConfig(name=name))) == []
    with pytest.raises(RecipeError) as e:
        build_backbone(BackboneConfig(name=name, freeze_patch_embed=True))
    assert "freeze_patch_embed" in str(e.value) and name in str(e.value)


def test_groupnorm_ws_has_no_batch_statistics():
    """``norm = groupnorm_ws``: GroupNorm + weight-standardised convs, so a sample's features ignore its batch."""
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(name="resnet18", norm="groupnorm_ws")).train()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(type(m) is not nn.Conv2d for m in model.modules())
    assert not [k for k in model.state_dict() if "running" in k]
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)
    # the convolution really standardises its weight: scaling a filter does not change the output
    conv = model.conv1
    before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(0.5)
    assert torch.allclose(conv(x), before, rtol=2e-2, atol=2e-2)  # up to eps 1e-5 against var(w) ~ 6e-4


def test_groupnorm_ws_rejects_models_without_batchnorm():
    with pytest.raises(RecipeError, match="backbone.norm"):
        build_backbone(BackboneConfig(name="test_vit", norm="groupnorm_ws"))


def test_a_view_size_that_does_not_fit_the_vit_is_one_line_before_training() -> None:
    """timm's patch embedding stopped the first step with an AssertionError; now the recipe is refused up front."""
    from conftest import assert_one_line_error
    from ssl_cli.config import load_recipe
    from ssl_cli.train.launch import DEMO_VIT_OVERRIDES
    from ssl_cli.train.pretrain import build_method

    vit = [*DEMO_VIT_OVERRIDES.items(), ("backbone.kwargs.depth", 1)]

    def build(*extra):
        return build_method(load_recipe("mocov3-vit", [*vit, *extra]))

    assert_one_line_error(r"views.0.size: 40 does not fit the ViT, built for 32x32; set backbone.img_size = 40", build,
                          ("views.*.size", 40))  # fmt: skip
    assert_one_line_error(r"views.0.size: 36 is not a multiple of the ViT's patch size 8", build,
                          ("views.*.size", 36), ("backbone.dynamic_img_size", True))  # fmt: skip
    build(("views.*.size", 40), ("backbone.dynamic_img_size", True))  # a multiple of the patch: any size
    build(("views.*.size", 32))
