"""Export and checkpoint files: timm loads the export as is, nothing is pickled, writes are atomic; TorchScript,
ONNX and Hugging Face-style exports give PyTorch's features on other batch sizes, bad requests are one line."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from click.testing import Result
from helpers import corrupt_tensors, invoke
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ssl_cli
import ssl_cli.artifacts.safetensors_io as safetensors_io
import ssl_cli.export.checks as checks
from conftest import TINY, write_image_folder
from ssl_cli.artifacts.atomic import DiskFull
from ssl_cli.artifacts.checkpoint import EXPORT_FORMAT, FORMAT, read_checkpoint
from ssl_cli.artifacts.integrity import HASH_KEY
from ssl_cli.artifacts.safetensors_io import atomic_save
from ssl_cli.backbones import build_backbone
from ssl_cli.config import load_recipe
from ssl_cli.config.schema import BackboneConfig
from ssl_cli.errors import CheckpointError
from ssl_cli.export.backbone import export_backbone
from ssl_cli.export.formats import export_model, resolve_format
from ssl_cli.train.checkpoint import save_checkpoint
from ssl_cli.train.pretrain import build_method, pretrain

# torch >= 2.9 deprecates TorchScript; the format is still what many deployments load
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

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
    # read whole: no patch-grid readout (CPC v2's: tests/methods/test_cpcv2.py), the timm model itself
    assert "readout" not in config and "readout" not in meta and "readout" not in stock.summary
    assert isinstance(ssl_cli.load_backbone(str(stock.export)), timm.models.ResNet)


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


def test_export_refuses_a_checkpoint_whose_weights_changed_after_writing(stock, tmp_path: Path) -> None:
    ckpt = tmp_path / "last.safetensors"
    ckpt.write_bytes(stock.ckpt.read_bytes())
    corrupt_tensors(ckpt)
    for out in ("b.safetensors", "b.pt"):
        _user_error(_invoke("export", str(ckpt), "--out", str(tmp_path / out)), f"error: {ckpt}: its tensors do not")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]  # nothing written


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
    assert len(header["__metadata__"][HASH_KEY]) == 64  # checked on every read (tests/artifacts/test_integrity.py)
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
    "exc, raised",
    [(OSError(28, "No space left on device"), DiskFull), (KeyboardInterrupt(), KeyboardInterrupt)],
    ids=["oserror", "ctrl-c"],
)
def test_failed_save_keeps_the_previous_file(tmp_path: Path, monkeypatch, exc: BaseException, raised) -> None:
    target = tmp_path / "checkpoints" / "last.safetensors"
    atomic_save({"w": torch.ones(3)}, {"format": FORMAT, "epoch": 1}, target)
    before = target.read_bytes()

    monkeypatch.setattr(safetensors_io, "save_file", _failing_save(exc))
    with pytest.raises(raised):
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
    monkeypatch.setattr(safetensors_io, "save_file", _failing_save(OSError(28, "disk full"), calls, fail_at=3))
    with pytest.raises(DiskFull, match=r"no space left on the device of .* while writing last.safetensors") as info:
        pretrain(recipe, str(data), tmp_path / "run")
    assert "continue the run with: ssl pretrain --out" in str(info.value) and "\n" not in str(info.value)
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


# --- export formats: TorchScript, ONNX, Hugging Face-style folder -----------------------------------------

OTHER_BATCH = 5  # neither the batch the model was exported with (2) nor the one the export checked (3)
ATOL = 1e-4


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> SimpleNamespace:
    """timm's ``test_vit`` (6 blocks of width 64) with 8x8 patches at 32x32, trained one step."""
    return _train(
        tmp_path_factory.mktemp("vit"),
        [
            ("backbone.name", "test_vit"),
            ("backbone.img_size", 32),
            ("backbone.patch_size", 8),
            ("train.batch_size", 16),
        ],
        per_class=8,
        classes=2,
    )


def _trained_backbone(ckpt: Path) -> torch.nn.Module:
    """The method's own backbone with the checkpoint's weights: the reference, built without ssl_cli.export.backbone."""
    loaded = read_checkpoint(ckpt)
    method = build_method(loaded.recipe)
    method.load_state_dict(loaded.section("model"))
    return method.backbone.eval()


def _size(t: SimpleNamespace) -> int:
    return max(v.size for v in t.recipe.views)


def _run_export(t: SimpleNamespace, fmt: str, tmp_path: Path):
    """Export ``t`` as ``fmt``; returns the summary and a function that runs the written file."""
    out = tmp_path / {"torchscript": "b.pt", "onnx": "b.onnx", "hf": "hf", "safetensors": "b.safetensors"}[fmt]
    summary = export_model(t.ckpt, out, fmt)
    assert summary["format"] == fmt and summary["path"] == str(out)
    assert 0 <= summary["max_abs_diff"] <= summary["tolerance"]
    if fmt == "torchscript":
        module = torch.jit.load(str(out))
        return summary, lambda x: module(x)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["images"]
        assert [o.name for o in session.get_outputs()] == ["features"]
        assert isinstance(session.get_inputs()[0].shape[0], str)  # a named, dynamic batch axis
        assert session.get_inputs()[0].shape[1:] == [3, _size(t), _size(t)]
        return summary, lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    if fmt == "hf":
        model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        return summary, lambda x: model(x)
    return summary, lambda x: ssl_cli.load_backbone(out)(x)


@pytest.mark.parametrize(
    "which, fmt",
    [
        ("stock", "torchscript"),
        ("stock", "onnx"),
        ("stock", "hf"),
        ("stock", "safetensors"),
        ("small_stem", "torchscript"),
        pytest.param("small_stem", "onnx", marks=pytest.mark.slow),  # ~4 s: ONNX of a ResNet is covered above
        ("vit", "torchscript"),
        ("vit", "onnx"),
        ("vit", "hf"),
    ],
)
def test_every_format_gives_pytorchs_features(request, tmp_path: Path, which: str, fmt: str) -> None:
    t = request.getfixturevalue(which)
    summary, run = _run_export(t, fmt, tmp_path)
    reference_model = _trained_backbone(t.ckpt)
    x = torch.randn(OTHER_BATCH, 3, _size(t), _size(t), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference, got = reference_model(x), run(x)
    assert got.shape == (OTHER_BATCH, reference_model.num_features)
    assert (got - reference).abs().max() <= ATOL, (got - reference).abs().max()
    assert summary["num_features"] == reference_model.num_features
    # the same architecture with other weights is far off: the comparison above can fail
    torch.manual_seed(1)
    with torch.no_grad():
        other = build_backbone(read_checkpoint(t.ckpt).recipe.backbone).eval()(x)
    assert (other - reference).abs().max() > 100 * ATOL


def test_torchscript_keeps_projector_layers(stock, tmp_path: Path) -> None:
    summary = export_model(stock.ckpt, tmp_path / "p.pt", projector_layers=1)
    assert summary["projector_layers"] == 1 and summary["num_features"] == 64
    head = read_checkpoint(stock.ckpt).section("model.projector")
    x = _input()
    with torch.no_grad():
        pooled = _trained_backbone(stock.ckpt)(x)
        # Linear (no bias: a BatchNorm follows) -> BatchNorm1d with its running statistics -> ReLU, by hand
        h = pooled @ head["0.weight"].T
        h = (h - head["1.running_mean"]) / torch.sqrt(head["1.running_var"] + 1e-5) * head["1.weight"] + head["1.bias"]
        expected = torch.relu(h)
        got = torch.jit.load(str(tmp_path / "p.pt"))(x)
    assert got.shape == (4, 64) and (got - expected).abs().max() <= ATOL


def test_onnx_falls_back_to_the_torchscript_based_exporter(stock, tmp_path: Path, monkeypatch) -> None:
    """Where torch.export cannot take a model, torch's older exporter is used, and checked the same way."""
    real = torch.onnx.export

    def no_dynamo(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("torch.export failed\nsecond line")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    summary, run = _run_export(stock, "onnx", tmp_path)
    assert summary["exporter"] == "torchscript"
    x = torch.randn(OTHER_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    assert (run(x) - _features(_trained_backbone(stock.ckpt), x)).abs().max() <= ATOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.onnx"]


def test_hf_folder_is_timms_hub_layout(vit, tmp_path: Path) -> None:
    export_model(vit.ckpt, tmp_path / "hf", "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architecture"] == "test_vit" and config["num_classes"] == 0 and config["num_features"] == 64
    assert config["model_args"] == {"num_classes": 0, "img_size": 32, "patch_size": 8}
    cfg = config["pretrained_cfg"]
    assert (
        cfg["input_size"] == [3, 32, 32] and cfg["mean"] == vit.recipe.data.mean and cfg["std"] == vit.recipe.data.std
    )
    assert cfg["crop_pct"] == 1.0 and cfg["crop_mode"] == "center" and cfg["num_classes"] == 0
    # timm's own preprocessing resolution reads it back
    model = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert list(data_cfg["mean"]) == vit.recipe.data.mean and tuple(data_cfg["input_size"]) == (3, 32, 32)
    # the weights file is exactly timm's state_dict, and ssl reads the folder too
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(weights) == set(model.state_dict())
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        assert HASH_KEY in f.metadata()
    x = _input()
    assert torch.equal(_features(model, x), _features(ssl_cli.load_backbone(str(tmp_path / "hf")), x))


def _gn_export(path: Path) -> Path:
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(name="test_resnet", norm="groupnorm_ws"))
    meta = {
        "format": EXPORT_FORMAT,
        "backbone": {"name": "test_resnet", "kwargs": {}, "small_stem": False, "norm": "groupnorm_ws"},
        "preprocessing": {"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [3, 32, 32]},
    }
    atomic_save(model.state_dict(), meta, path)
    return path


@pytest.mark.parametrize("which", ["small_stem", "groupnorm_ws", "projector"])
def test_hf_refuses_what_timm_cannot_rebuild(request, tmp_path: Path, which: str) -> None:
    if which == "small_stem":
        ckpt, layers, named = request.getfixturevalue("small_stem").ckpt, 0, "small (CIFAR) stem"
    elif which == "groupnorm_ws":
        ckpt, layers, named = _gn_export(tmp_path / "gn.safetensors"), 0, "norm groupnorm_ws"
    else:
        ckpt, layers, named = request.getfixturevalue("stock").ckpt, 1, "1 projector layer"
    with pytest.raises(CheckpointError) as err:
        export_model(ckpt, tmp_path / "hf", "hf", projector_layers=layers)
    line = _one_line(err)
    assert named in line and "torchscript" in line and "onnx" in line and "load_backbone" in line
    assert not (tmp_path / "hf").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_groupnorm_ws_exports_to_torchscript(tmp_path: Path) -> None:
    src = _gn_export(tmp_path / "gn.safetensors")
    summary = export_model(src, tmp_path / "gn.pt")
    x = torch.randn(OTHER_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    expected = _features(ssl_cli.load_backbone(src), x)
    assert summary["format"] == "torchscript"
    assert (_features(torch.jit.load(str(tmp_path / "gn.pt")), x) - expected).abs().max() <= ATOL


@pytest.mark.parametrize(
    "fmt, out, expected",
    [
        (None, None, ("safetensors", "backbone.safetensors")),
        ("onnx", None, ("onnx", "backbone.onnx")),
        ("hf", None, ("hf", "backbone")),
        (None, "a/b.safetensors", ("safetensors", "a/b.safetensors")),
        (None, "b.pt", ("torchscript", "b.pt")),
        (None, "b.torchscript", ("torchscript", "b.torchscript")),
        (None, "b.ONNX", ("onnx", "b.ONNX")),
        (None, "folder/", ("hf", "folder")),
        (None, "folder", ("hf", "folder")),
        ("hf", "v1.2/", ("hf", "v1.2")),
        ("hf", "v1.2", ("hf", "v1.2")),
        ("TorchScript", "b.pt", ("torchscript", "b.pt")),
    ],
)
def test_format_from_the_suffix(fmt, out, expected) -> None:
    got_fmt, got_path = resolve_format(fmt, out)
    assert (got_fmt, got_path) == (expected[0], Path(expected[1]))


@pytest.mark.parametrize(
    "fmt, out, fragments",
    [
        ("zip", "b.zip", ["--format zip", "safetensors, torchscript, onnx, hf"]),
        (None, "b.pth", ["'.pth'", ".safetensors", ".onnx", "--format"]),
        ("onnx", "b.pt", ["--format onnx", "b.pt", "is a torchscript file", ".onnx"]),
        ("torchscript", "b.safetensors", ["--format torchscript", "safetensors", ".pt"]),
        ("safetensors", "folder/", ["--format safetensors", "names a folder", ".safetensors"]),
        ("onnx", "b.pth", ["--format onnx", "unknown suffix '.pth'", ".onnx"]),
        ("hf", "b.onnx", ["--format hf", "folder", "onnx"]),
    ],
)
def test_format_errors_are_one_line(stock, tmp_path: Path, fmt, out, fragments) -> None:
    with pytest.raises(CheckpointError) as err:
        resolve_format(fmt, out)
    line = _one_line(err)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    # and through the command: exit 2, one error line, nothing written
    args = ["export", str(stock.ckpt), "--out", str(tmp_path / out), *(["--format", fmt] if fmt else [])]
    result = _invoke(*args)
    _user_error(result, fragments[0])
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_packages_say_what_to_install(stock, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(CheckpointError) as err:
        export_model(stock.ckpt, tmp_path / "b.onnx")
    line = _one_line(err)
    assert "onnxruntime" in line and "pip install" in line and "ssl-cli[onnx]" in line
    _user_error(_invoke("export", str(stock.ckpt), "--out", str(tmp_path / "b.onnx")), "pip install")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["torchscript", "hf"])
def test_a_failed_check_leaves_nothing_and_keeps_the_earlier_output(stock, tmp_path: Path, monkeypatch, fmt) -> None:
    out = tmp_path / ("b.pt" if fmt == "torchscript" else "hf")
    export_model(stock.ckpt, out, fmt)  # an earlier, good export
    before = {p.name: p.read_bytes() for p in ([out] if out.is_file() else out.iterdir())}
    monkeypatch.setattr(checks, "TOLERANCE", -1.0)  # every comparison fails
    with pytest.raises(CheckpointError) as err:
        export_model(stock.ckpt, out, fmt)
    assert "does not reproduce the PyTorch model" in _one_line(err)
    after = {p.name: p.read_bytes() for p in ([out] if out.is_file() else out.iterdir())}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file or folder is left


class _Spiky(torch.nn.Module):
    """Features with one channel at ``peak``: what a layer with corrupted weights gives (8.45e+29 in a case tried)."""

    def __init__(self, peak: float) -> None:
        super().__init__()
        self.peak = peak

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x.flatten(1)[:, :8].clone()
        features[:, 0] = self.peak
        return features


def test_the_check_tolerance_stops_growing_with_the_features() -> None:
    """The tolerance was relative to max |feature|: one huge channel let every other one be wrong by 50."""
    model, size = _Spiky(1e6), [3, 4, 4]
    wrong = torch.tensor([0.0] + [50.0] * 7)
    with pytest.raises(CheckpointError) as err:
        checks.compare(model, lambda x: model(x) + wrong, size, "the test runtime")
    line = _one_line(err)
    assert "max abs difference 50 > tolerance 0.1" in line and "features reach 1e+06" in line
    # float32-sized differences still pass at the scales trained backbones give
    for peak in (0.5, 20.0, 500.0):
        model = _Spiky(peak)
        assert checks.compare(model, lambda x, m=model: m(x) * (1 + 1e-7), size, "the test runtime")["tolerance"] <= 0.1


@pytest.mark.parametrize("side", ["written", "pytorch"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_the_check_fails_on_non_finite_features(side: str, value: float) -> None:
    model = _Spiky(value) if side == "pytorch" else _Spiky(3.0)
    run = _Spiky(value) if side == "written" else _Spiky(3.0)
    with pytest.raises(CheckpointError) as err:
        checks.compare(model, run, [3, 4, 4], "the test runtime")
    expected = "the written file gives non-finite" if side == "written" else "the PyTorch model itself gives non-finite"
    assert expected in _one_line(err)


def test_outputs_that_are_refused(stock, tmp_path: Path) -> None:
    before = stock.ckpt.read_bytes()
    with pytest.raises(CheckpointError, match="checkpoint itself"):
        export_model(stock.ckpt, stock.ckpt)
    with pytest.raises(CheckpointError, match="contains the checkpoint"):
        export_model(stock.ckpt, stock.ckpt.parent, "hf")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not an earlier hf export"):
        export_model(stock.ckpt, tmp_path / "mine", "hf")
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(CheckpointError, match="is a folder"):
        export_model(stock.ckpt, tmp_path / "dir.pt")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert stock.ckpt.read_bytes() == before
    # an earlier hf export is replaced by the new one
    export_model(stock.ckpt, tmp_path / "hf", "hf")
    (tmp_path / "hf" / "config.json").write_text("{}")
    export_model(stock.ckpt, tmp_path / "hf/", "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architecture"] == "test_resnet"


def test_export_command_json_and_table(stock, tmp_path: Path) -> None:
    result = _invoke("export", str(stock.ckpt), "--out", str(tmp_path / "b.pt"), "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("\n") == 1
    payload = json.loads(result.stdout)
    assert payload["format"] == "torchscript" and payload["path"] == str(tmp_path / "b.pt")
    assert payload["max_abs_diff"] <= payload["tolerance"] and payload["verified_with"] == "torch.jit.load"
    result = _invoke("export", str(stock.ckpt), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert result.exit_code == 0, result.stderr
    assert "max_abs_diff" in result.stdout and "test_resnet" in result.stdout
    assert "max abs difference" in result.stderr and f"local-dir:{tmp_path / 'hf'}" in result.stderr


def _invoke(*args: str) -> Result:
    return invoke(*args, columns=120)


def _user_error(result: Result, fragment: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def test_a_full_disk_during_a_torchscript_export_is_one_line_and_keeps_the_earlier_file(stock, tmp_path, monkeypatch):
    """TorchScript is serialised in memory and written by Python: a full disk is one line (``torch.jit.save`` straight
    to the file aborted the process with a C++ stack dump, exit 134, and left its staging folder)."""
    out = tmp_path / "b.pt"
    export_model(stock.ckpt, out, "torchscript")
    before = out.read_bytes()
    real = Path.write_bytes

    def full(self, data):
        real(self, bytes(data)[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    _user_error(_invoke("export", str(stock.ckpt), "--out", str(out)), "no space left on the device")
    _user_error(_invoke("export", str(stock.ckpt), "--out", str(out)), "b.pt is kept as it was")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pt"]  # no staging folder is left


def test_the_staging_folder_of_an_export_killed_outright_goes_at_the_next_export(stock, tmp_path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = tmp_path / f".b.pt.{proc.pid}-x1y2z3.tmp"  # what a kill -9 during an export leaves
    stale.mkdir()
    (stale / "b.pt").write_bytes(b"\0" * 4096)
    export_model(stock.ckpt, tmp_path / "b.pt", "torchscript")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pt"]
