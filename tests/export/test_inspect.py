"""``ssl inspect``: what a training checkpoint or an export (safetensors, hf folder, TorchScript, ONNX) says,
checked against independent sources (the run's metrics.jsonl, the data folder, timm), and one error line for
anything else."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from click.testing import Result
from helpers import corrupt_tensors, invoke
from safetensors.torch import save_file

import ssl_cli
import ssl_cli.artifacts.backbone as backbone_module
import ssl_cli.artifacts.checkpoint as checkpoint_module
from conftest import TINY, write_image_folder
from ssl_cli.artifacts.checkpoint import EXPORT_FORMAT
from ssl_cli.artifacts.integrity import HASH_KEY
from ssl_cli.artifacts.safetensors_io import atomic_save, read_safetensors
from ssl_cli.backbones import build_backbone
from ssl_cli.config import load_recipe
from ssl_cli.config.schema import BackboneConfig
from ssl_cli.errors import CheckpointError
from ssl_cli.export.backbone import export_backbone
from ssl_cli.export.formats import export_model
from ssl_cli.export.inspect import describe
from ssl_cli.train.pretrain import pretrain

SMALL_HEAD = [("method.proj_hidden_dim", 64), ("method.proj_output_dim", 32)]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    """SimCLR on test_resnet, 2 epochs of 2 steps on 64 images of 4 classes, and its exports."""
    root = tmp_path_factory.mktemp("inspect")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test thread limit
    try:
        data = write_image_folder(root / "data", per_class=16, classes=4)
        recipe = load_recipe("simclr", [*TINY, *SMALL_HEAD, ("train.epochs", 2)])
        ckpt = Path(pretrain(recipe, str(data), root / "run").checkpoint)
        export_backbone(ckpt, root / "b.safetensors")
        export_model(ckpt, root / "b.pt")
        export_model(ckpt, root / "hf", "hf")
    finally:
        torch.set_num_threads(threads)
    last = json.loads((root / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    return SimpleNamespace(root=root, data=data, recipe=recipe, ckpt=ckpt, last=last)


def _invoke(*args: str | Path) -> Result:
    return invoke("inspect", *args, columns=200)


def _json(*args: str | Path) -> dict:
    result = _invoke(*args, "--json")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stdout.count("\n") == 1
    return json.loads(result.stdout)


def _user_error(result: Result, fragment: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    return lines[0]


def _timm_parameters(name: str) -> int:
    return sum(p.numel() for p in timm.create_model(name, num_classes=0).parameters())


def test_a_training_checkpoint(run) -> None:
    info = _json(run.ckpt)
    assert info["kind"] == "training checkpoint" and info["format"] == "safetensors"
    assert info["format_version"] == "ssl-checkpoint/1" and info["file_size"] == run.ckpt.stat().st_size
    assert info["method"] == "simclr" and info["recipe"] == "simclr" and info["ssl_version"] == ssl_cli.__version__
    assert info["resolved_recipe"] == run.recipe.to_dict()
    assert (info["epoch"], info["epochs"], info["step"]) == (2, 2, run.last["step"]) == (2, 2, 4)
    backbone = info["backbone"]
    assert backbone["name"] == "test_resnet" and backbone["small_stem"] is False and backbone["norm"] == "batchnorm"
    assert backbone["stem"] == "timm"
    assert backbone["parameters"] == _timm_parameters("test_resnet")
    assert info["num_features"] == timm.create_model("test_resnet", num_classes=0).num_features
    data = info["data"]
    assert data["num_images"] == 64 and data["num_classes"] == 4 and data["name"] == "data"
    assert data["classes"] == sorted(p.name for p in run.data.iterdir()) and data["spec"] == str(run.data)
    assert info["metrics"]["loss"] == pytest.approx(run.last["loss"]) and info["metrics"]["lr"] == run.last["lr"]
    assert info["preprocessing"] == {
        "mean": run.recipe.data.mean,
        "std": run.recipe.data.std,
        "input_size": [3, 32, 32],
    }
    assert info["optimizer_state"] is True
    assert info["tensors_sha256"] == "verified"

    table = _invoke(run.ckpt)
    assert table.exit_code == 0 and table.stderr == ""
    for fragment in (
        "training checkpoint",
        "simclr",
        "timm test_resnet",
        f"{_timm_parameters('test_resnet'):,}",
        "epoch 2 of 2, step 4",
        f"data ({run.data}): 64 images, 4 classes",
        f"loss {run.last['loss']:.4f}",
        "input 3x32x32",
        "verified: the tensors match the SHA-256 recorded when the file was written",
    ):
        assert fragment in table.stdout, (fragment, table.stdout)


def test_monitor_figures_are_shown(run, tmp_path: Path) -> None:
    """The online kNN / probe figures of a run with --val, written into a copy's metadata."""
    tensors, meta = read_safetensors(run.ckpt)
    meta["metrics"] = {**meta["metrics"], "knn_top1": 0.4321, "online_val_top1": 0.3579}
    meta["monitor"] = {"val": "test10", "num_val_images": 10}
    atomic_save(tensors, meta, tmp_path / "monitored.safetensors")
    info = describe(tmp_path / "monitored.safetensors")
    assert info["metrics"]["knn_top1"] == 0.4321 and info["monitor"]["val"] == "test10"
    table = _invoke(tmp_path / "monitored.safetensors").stdout
    assert "knn_top1 0.4321" in table and "online_val_top1 0.3579" in table and "(on test10)" in table


@pytest.mark.parametrize("which, fmt", [("b.safetensors", "safetensors"), ("hf", "hf"), ("b.pt", "torchscript")])
def test_an_export_says_what_it_was_trained_with(run, which: str, fmt: str) -> None:
    info = _json(run.root / which)
    assert info["kind"] == "export" and info["format"] == fmt and info["format_version"] == EXPORT_FORMAT
    assert info["method"] == "simclr" and info["recipe"] == "simclr" and info["epoch"] == 2 and info["epochs"] == 2
    assert info["backbone"]["name"] == "test_resnet" and info["backbone"]["parameters"] == _timm_parameters(
        "test_resnet"
    )
    assert info["data"]["num_images"] == 64 and info["data"]["num_classes"] == 4
    assert info["metrics"]["loss"] == pytest.approx(run.last["loss"])
    assert info["preprocessing"]["input_size"] == [3, 32, 32]
    size = (
        sum(p.stat().st_size for p in (run.root / which).rglob("*"))
        if fmt == "hf"
        else (run.root / which).stat().st_size
    )
    assert info["file_size"] == size
    assert info["tensors_sha256"] == (None if fmt == "torchscript" else "verified")  # TorchScript: not safetensors
    table = _invoke(run.root / which).stdout
    assert "export" in table and "timm test_resnet" in table and "epoch 2 of 2" in table


def test_an_onnx_export(run, tmp_path: Path) -> None:
    """A minimal ONNX model carrying an export's metadata (the exporter itself is tested in test_export)."""
    import onnx
    from onnx import TensorProto, helper

    _, meta = read_safetensors(run.root / "b.safetensors")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["features"])],
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 96])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 96])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(model, {"ssl": json.dumps(meta)})
    onnx.save(model, str(tmp_path / "m.onnx"))
    info = _json(tmp_path / "m.onnx")
    assert info["format"] == "onnx" and info["method"] == "simclr" and info["epoch"] == 2
    assert info["onnx"]["opset"] == 18 and info["onnx"]["inputs"] == ["images"]
    assert info["data"]["num_images"] == 64


def test_an_export_from_before_it_kept_its_source(tmp_path: Path) -> None:
    """Exports written before ``source`` was added say less, but are still described."""
    meta = {
        "format": EXPORT_FORMAT,
        "backbone": {"name": "test_resnet", "kwargs": {}},
        "preprocessing": {"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [3, 32, 32]},
        "config": {"method": "byol", "epoch": 7, "num_features": 96},
    }
    atomic_save(timm.create_model("test_resnet", num_classes=0).state_dict(), meta, tmp_path / "old.safetensors")
    info = describe(tmp_path / "old.safetensors")
    assert info["method"] == "byol" and info["epoch"] == 7 and info["data"] is None and info["recipe"] is None
    assert "epoch 7" in _invoke(tmp_path / "old.safetensors").stdout


@pytest.mark.parametrize("which", ["run/checkpoints/last.safetensors", "hf"])
def test_weights_changed_after_writing_are_one_line(run, tmp_path: Path, which: str) -> None:
    copy = tmp_path / which
    copy.parent.mkdir(parents=True, exist_ok=True)
    if which == "hf":
        copy.mkdir()
        for name in ("config.json", "model.safetensors"):
            (copy / name).write_bytes((run.root / "hf" / name).read_bytes())
        corrupt_tensors(copy / "model.safetensors")
    else:
        copy.write_bytes(run.ckpt.read_bytes())
        corrupt_tensors(copy)
    weights = copy / "model.safetensors" if which == "hf" else copy
    _user_error(_invoke(copy), f"error: {weights}: its tensors do not match the {HASH_KEY} recorded when it was")


def test_a_file_without_the_hash_is_described_as_not_verified(run, tmp_path: Path) -> None:
    """Written before ssl recorded the hash: described as before, its tensors not checked."""
    tensors, meta = read_safetensors(run.root / "b.safetensors")
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={k: json.dumps(v) for k, v in meta.items()})
    info = _json(tmp_path / "old.safetensors")
    assert info["tensors_sha256"] == "not recorded" and info["method"] == "simclr"
    assert "no tensor hash recorded" in _invoke(tmp_path / "old.safetensors").stdout


def test_a_small_stem_export(tmp_path: Path) -> None:
    """resnet18 with the CIFAR stem: 3x3 conv1 (64 x 3 x 3 x 3) instead of 7x7 (64 x 3 x 7 x 7), no max-pool."""
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(name="resnet18", small_stem=True))
    meta = {
        "format": EXPORT_FORMAT,
        "backbone": {"name": "resnet18", "kwargs": {}, "small_stem": True, "norm": "batchnorm"},
        "preprocessing": {"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [3, 32, 32]},
    }
    atomic_save(model.state_dict(), meta, tmp_path / "small.safetensors")
    info = describe(tmp_path / "small.safetensors")
    assert info["backbone"]["small_stem"] is True and info["backbone"]["stem"] == "small"
    assert info["backbone"]["parameters"] == _timm_parameters("resnet18") - 64 * 3 * 7 * 7 + 64 * 3 * 3 * 3
    assert "small stem: 3x3 conv1, no max-pool" in _invoke(tmp_path / "small.safetensors").stdout


def test_only_the_header_is_read(run, monkeypatch) -> None:
    """No tensor is loaded: the tensors' hash is checked over the file's bytes in place (~0.1 s per 100 MB)."""

    def no_tensors(*_args, **_kwargs):
        raise AssertionError("the tensors were read")

    monkeypatch.setattr(checkpoint_module, "read_safetensors", no_tensors)
    monkeypatch.setattr(backbone_module, "read_safetensors", no_tensors)
    from safetensors import safe_open

    class NoGet:
        def __init__(self, *args, **kwargs):
            self.inner = safe_open(*args, **kwargs)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def metadata(self):
            return self.f.metadata()

        def keys(self):
            return self.f.keys()

        def get_slice(self, key):
            return self.f.get_slice(key)

        def get_tensor(self, key):
            raise AssertionError("a tensor was read")

    monkeypatch.setattr("safetensors.safe_open", NoGet)
    info = describe(run.ckpt)
    assert info["method"] == "simclr" and info["tensors_sha256"] == "verified"


def test_what_is_not_a_checkpoint_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello\n" * 50)
    _user_error(_invoke(tmp_path / "notes.txt"), f"{tmp_path / 'notes.txt'} is not a checkpoint or export")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    _user_error(_invoke(tmp_path / "empty.safetensors"), "not a safetensors file")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    _user_error(_invoke(tmp_path / "plain.safetensors"), "not an ssl checkpoint or export")
    _user_error(_invoke(tmp_path / "missing.safetensors"), "not found")
    (tmp_path / "folder").mkdir()
    _user_error(_invoke(tmp_path / "folder"), "not an hf export")
    with zipfile.ZipFile(tmp_path / "archive.pt", "w") as z:
        z.writestr("archive/data.pkl", b"x")
    _user_error(_invoke(tmp_path / "archive.pt"), "not a TorchScript export written by ssl")
    with pytest.raises(CheckpointError):
        describe(tmp_path / "notes.txt")
