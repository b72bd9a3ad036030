"""Export and checkpoint files: timm loads the export as is, nothing is pickled, writes are atomic."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ssl_cli
import ssl_cli.train.checkpoint as checkpoint_module
from conftest import TINY, write_image_folder
from ssl_cli.config import load_recipe
from ssl_cli.errors import CheckpointError
from ssl_cli.export import export_backbone
from ssl_cli.train.checkpoint import EXPORT_FORMAT, FORMAT, atomic_save, read_checkpoint, save_checkpoint
from ssl_cli.train.pretrain import build_method, pretrain

# a small projector keeps the tiny runs fast; the backbone is what these tests are about
SMALL_HEAD = [("method.proj_hidden_dim", 64), ("method.proj_output_dim", 32)]


def _train(root: Path, overrides: list, per_class: int = 32, classes: int = 4) -> SimpleNamespace:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = write_image_folder(root / "data", per_class=per_class, classes=classes)
        recipe = load_recipe("simclr", [*TINY, *SMALL_HEAD, *overrides])
        result = pretrain(recipe, str(data), root / "run")
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(root=root, data=data, recipe=recipe, ckpt=Path(result.checkpoint), run=root / "run")


@pytest.fixture(scope="module")
def stock(tmp_path_factory) -> SimpleNamespace:
    """A tiny SimCLR run on timm's ``test_resnet`` (a stock architecture), exported once."""
    t = _train(tmp_path_factory.mktemp("stock"), [])
    t.export = t.root / "export" / "backbone.safetensors"
    t.summary = export_backbone(t.ckpt, t.export)
    return t


@pytest.fixture(scope="module")
def small_stem(tmp_path_factory) -> SimpleNamespace:
    """resnet18 with the CIFAR stem (3x3 stride-1 conv1, no max-pool): 16 images of 16x16, one step."""
    t = _train(
        tmp_path_factory.mktemp("small_stem"),
        [
            ("backbone.name", "resnet18"),
            ("backbone.small_stem", True),
            ("views.*.size", 16),
            ("train.batch_size", 16),
        ],
        per_class=8,
        classes=2,
    )
    t.export = t.root / "backbone.safetensors"
    t.summary = export_backbone(t.ckpt, t.export)
    return t


def _input(size: int = 32) -> torch.Tensor:
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(123))


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# --- the export -------------------------------------------------------------------------------------------


def test_export_keys_are_exactly_timms(stock) -> None:
    exported = load_file(str(stock.export))
    reference = timm.create_model("test_resnet", num_classes=0).state_dict()
    assert set(exported) == set(reference)
    for key, value in reference.items():
        assert exported[key].shape == value.shape, key
        assert exported[key].dtype == value.dtype, key


def test_export_weights_are_the_checkpoints_backbone(stock) -> None:
    exported = load_file(str(stock.export))
    backbone = read_checkpoint(stock.ckpt).section("model.backbone")
    assert set(exported) == set(backbone)
    for key in exported:
        assert torch.equal(exported[key], backbone[key]), key
    # and they are trained weights, not a fresh initialisation
    fresh = timm.create_model("test_resnet", num_classes=0).state_dict()
    assert any(not torch.equal(exported[k], fresh[k]) for k in exported if exported[k].is_floating_point())


def test_export_json_config(stock) -> None:
    config_path = stock.export.with_suffix(".json")
    assert stock.summary["backbone"] == str(stock.export)
    assert stock.summary["config"] == str(config_path)
    config = json.loads(config_path.read_text())
    assert config["architecture"] == "test_resnet"
    assert config["timm_kwargs"] == {}
    assert config["small_stem"] is False
    assert config["stem_change"] is None
    assert config["mean"] == stock.recipe.data.mean
    assert config["std"] == stock.recipe.data.std
    assert config["input_size"] == [3, 32, 32]
    assert config["num_classes"] == 0
    assert config["num_features"] == timm.create_model("test_resnet", num_classes=0).num_features
    assert config["method"] == "simclr"
    assert config["epoch"] == 1
    with safe_open(str(stock.export), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == EXPORT_FORMAT
    assert json.loads(meta["config"]) == config


def test_timm_loads_the_export_with_identical_features(stock) -> None:
    x = _input()
    from_timm = timm.create_model(
        "test_resnet", num_classes=0, pretrained=True, pretrained_cfg_overlay=dict(file=str(stock.export))
    )
    features = _features(from_timm, x)

    # the same backbone rebuilt by ssl from the training checkpoint and from the export
    assert torch.equal(features, _features(ssl_cli.load_backbone(str(stock.ckpt)), x))
    assert torch.equal(features, _features(ssl_cli.load_backbone(str(stock.export)), x))

    # and the method's own backbone, with the weights read straight from the checkpoint
    ckpt = read_checkpoint(stock.ckpt)
    method = build_method(ckpt.recipe)
    method.load_state_dict(ckpt.section("model"))
    assert torch.equal(features, _features(method.backbone, x))

    # a different (untrained) model gives other features: the comparison above means something
    assert not torch.allclose(features, _features(timm.create_model("test_resnet", num_classes=0), x))


def test_small_stem_needs_load_backbone(small_stem) -> None:
    x = _input(16)
    config = json.loads(small_stem.export.with_suffix(".json").read_text())
    assert config["architecture"] == "resnet18"
    assert config["small_stem"] is True
    assert "load_backbone" in config["stem_change"]
    assert config["input_size"] == [3, 16, 16]
    assert small_stem.summary["small_stem"] is True

    model = ssl_cli.load_backbone(str(small_stem.export))
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    features = _features(model, x)
    assert torch.equal(features, _features(ssl_cli.load_backbone(str(small_stem.ckpt)), x))

    ckpt = read_checkpoint(small_stem.ckpt)
    method = build_method(ckpt.recipe)
    method.load_state_dict(ckpt.section("model"))
    assert torch.equal(features, _features(method.backbone, x))

    # plain timm builds the 7x7 stride-2 stem: the weights do not fit
    with pytest.raises(RuntimeError, match="conv1.weight"):
        timm.create_model(
            "resnet18", num_classes=0, pretrained=True, pretrained_cfg_overlay=dict(file=str(small_stem.export))
        )


# --- bad inputs -------------------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


def test_export_refuses_a_file_that_is_not_safetensors(tmp_path: Path) -> None:
    bad = tmp_path / "notes.safetensors"
    bad.write_text("this is not a checkpoint\n" * 20)
    with pytest.raises(CheckpointError) as err:
        export_backbone(bad, tmp_path / "out.safetensors")
    assert str(bad) in _one_line(err)
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "out.json").exists()


def test_export_refuses_a_safetensors_file_that_is_not_ssls(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), str(plain))
    with pytest.raises(CheckpointError) as err:
        export_backbone(plain, tmp_path / "out.safetensors")
    assert "format" in _one_line(err)
    assert not (tmp_path / "out.safetensors").exists()


def test_export_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        export_backbone(tmp_path / "nope.safetensors", tmp_path / "out.safetensors")
    assert "not found" in _one_line(err)


@pytest.mark.parametrize("name", ["backbone.pt", "backbone", "backbone.safetensors.json"])
def test_export_out_must_end_in_safetensors(stock, tmp_path: Path, name: str) -> None:
    with pytest.raises(CheckpointError) as err:
        export_backbone(stock.ckpt, tmp_path / name)
    assert ".safetensors" in _one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_export_never_overwrites_the_checkpoint(stock) -> None:
    before = stock.ckpt.read_bytes()
    same_file = stock.ckpt.parent / ".." / "checkpoints" / stock.ckpt.name
    for out in (stock.ckpt, same_file):
        with pytest.raises(CheckpointError) as err:
            export_backbone(stock.ckpt, out)
        assert "checkpoint itself" in _one_line(err)
    assert stock.ckpt.read_bytes() == before
    assert read_checkpoint(stock.ckpt).meta["format"] == FORMAT


def test_an_export_is_not_a_training_checkpoint(stock) -> None:
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(stock.export)
    assert "not an ssl training checkpoint" in _one_line(err)


# --- checkpoint files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["last", "epoch", "export"])
def test_files_are_plain_safetensors(stock, which: str) -> None:
    path = {"last": stock.ckpt, "epoch": stock.run / "checkpoints" / "epoch_0001.safetensors", "export": stock.export}
    raw = path[which].read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert raw[8:9] == b"{"
    header = json.loads(raw[8 : 8 + header_len])
    # the tensors fill the rest of the file exactly: nothing else (no pickle) is stored in it
    ends = [info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"]
    assert max(ends) == len(raw) - 8 - header_len
    assert all(isinstance(v, str) for v in header["__metadata__"].values())
    with safe_open(str(path[which]), framework="pt") as f:
        assert set(f.keys()) == set(header) - {"__metadata__"}


def test_checkpoint_metadata(stock) -> None:
    with safe_open(str(stock.ckpt), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    for key in ("format", "ssl_version", "recipe", "backbone", "preprocessing", "epoch", "step"):
        assert key in meta, key
    assert meta["format"] == FORMAT
    assert meta["ssl_version"] == ssl_cli.__version__
    assert json.loads(meta["recipe"]) == stock.recipe.to_dict()
    backbone = json.loads(meta["backbone"])
    assert backbone["name"] == "test_resnet" and backbone["small_stem"] is False
    assert json.loads(meta["preprocessing"]) == {
        "mean": stock.recipe.data.mean,
        "std": stock.recipe.data.std,
        "input_size": [3, 32, 32],
    }
    assert json.loads(meta["epoch"]) == 1
    assert json.loads(meta["step"]) == 128 // 32
    assert "rng.torch" in keys
    assert any(k.startswith("model.backbone.") for k in keys)
    assert any(k.startswith("model.projector.") for k in keys)
    assert any(k.startswith("optim.") for k in keys)
    assert read_checkpoint(stock.ckpt).recipe == stock.recipe


# --- atomic writes ----------------------------------------------------------------------------------------


def _failing_save(exc: BaseException, calls: list | None = None, fail_at: int = 1):
    """A stand-in for safetensors' save_file that writes part of a file, then raises (on call ``fail_at``)."""

    def save(tensors, filename, metadata=None):
        if calls is not None:
            calls.append(filename)
            if len(calls) != fail_at:
                return save_file(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"trunc')
        raise exc

    return save


@pytest.mark.parametrize(
    "exc", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["oserror", "ctrl-c"]
)
def test_failed_save_keeps_the_previous_file(tmp_path: Path, monkeypatch, exc: BaseException) -> None:
    target = tmp_path / "checkpoints" / "last.safetensors"
    atomic_save({"w": torch.ones(3)}, {"format": FORMAT, "epoch": 1}, target)
    before = target.read_bytes()

    monkeypatch.setattr(checkpoint_module, "save_file", _failing_save(exc))
    with pytest.raises(type(exc)):
        atomic_save({"w": torch.zeros(3)}, {"format": FORMAT, "epoch": 2}, target)

    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["last.safetensors"]
    with safe_open(str(target), framework="pt") as f:
        assert f.metadata()["epoch"] == "1"


def test_failed_save_during_training_keeps_last(tmp_path: Path, monkeypatch) -> None:
    """Epoch 2's save fails: checkpoints/last.safetensors is still epoch 1's, and no temp file is left."""
    data = write_image_folder(tmp_path / "data", per_class=8, classes=4)
    recipe = load_recipe("simclr", [*TINY, *SMALL_HEAD, ("train.epochs", 2)])
    calls: list = []
    # saves per epoch: last, then epoch_NNNN; call 3 is epoch 2's last
    monkeypatch.setattr(checkpoint_module, "save_file", _failing_save(OSError(28, "disk full"), calls, fail_at=3))
    with pytest.raises(OSError, match="disk full"):
        pretrain(recipe, str(data), tmp_path / "run")
    assert len(calls) == 3
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_0001.safetensors", "last.safetensors"]
    last = read_checkpoint(checkpoints / "last.safetensors")
    assert last.meta["epoch"] == 1 and last.meta["step"] == 1
    epoch1 = read_checkpoint(checkpoints / "epoch_0001.safetensors")
    for key, value in epoch1.section("model").items():
        assert torch.equal(last.section("model")[key], value), key


def test_successful_save_replaces_and_leaves_no_temp(tmp_path: Path, stock) -> None:
    ckpt = read_checkpoint(stock.ckpt)
    method = build_method(ckpt.recipe)
    target = tmp_path / "last.safetensors"
    target.write_bytes(b"old")
    meta = {k: ckpt.meta[k] for k in ("recipe", "backbone", "preprocessing")}
    save_checkpoint(target, method, None, {**meta, "epoch": 7, "step": 70})
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]
    again = read_checkpoint(target)
    assert again.meta["epoch"] == 7 and again.meta["step"] == 70
    assert not again.section("optim")
