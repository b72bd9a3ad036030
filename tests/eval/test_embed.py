"""``ssl embed``: the files round-trip (paths, labels, classes, values equal to a direct forward pass), the feature
cache is used, and every bad input is one error line with nothing overwritten."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import EVAL, direct_features, one_json, tiny_checkpoint, user_error
from helpers import wide_invoke as invoke
from safetensors import safe_open

from conftest import write_image_folder
from ssl_cli.eval import features as features_module


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("embed")
    labeled = write_image_folder(root / "labeled", per_class=3, classes=3)
    unlabeled = root / "unlabeled"
    (unlabeled / "nested").mkdir(parents=True)
    for i, png in enumerate(sorted(labeled.rglob("*.png"))[:5]):
        shutil.copy(png, (unlabeled / "nested" if i % 2 else unlabeled) / f"u{i}.png")
    return SimpleNamespace(
        root=root, ckpt=tiny_checkpoint(root / "ckpt.safetensors"), labeled=labeled, unlabeled=unlabeled
    )


def _embed(world, data: Path, out: Path, cache: Path, *extra) -> dict:
    return one_json(
        invoke("embed", world.ckpt, "--data", data, "--out", out, "--cache-dir", cache, "--json", *EVAL, *extra)
    )


def test_safetensors_and_npy_round_trip(world, tmp_path: Path) -> None:
    expected, paths = direct_features(world.ckpt, world.labeled)
    out = tmp_path / "emb.safetensors"
    summary = _embed(world, world.labeled, out, tmp_path / "cache")
    assert summary["count"] == 9 and summary["dim"] == 96 and summary["files"] == [str(out)]
    assert summary["checkpoint"] == str(world.ckpt) and summary["data"] == str(world.labeled)
    assert summary["labeled"] is True and summary["cached"] is False

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        embeddings, labels = f.get_tensor("embeddings"), f.get_tensor("labels")
    assert embeddings.dtype == torch.float32 and labels.dtype == torch.int64
    torch.testing.assert_close(embeddings, expected, rtol=1e-4, atol=1e-5)
    assert json.loads(meta["paths"]) == paths
    classes = json.loads(meta["classes"])
    assert classes == sorted(p.name for p in world.labeled.iterdir())
    assert [classes[i] for i in labels.tolist()] == [p.split("/")[0] for p in paths]  # label = the file's folder

    # .npy + .json, this time from the cache: the same values exactly
    npy = tmp_path / "emb.npy"
    again = _embed(world, world.labeled, npy, tmp_path / "cache")
    assert again["cached"] is True and again["files"] == [str(npy), str(tmp_path / "emb.json")]
    array = np.load(npy)
    assert array.dtype == np.float32 and np.array_equal(array, embeddings.numpy())
    side = json.loads((tmp_path / "emb.json").read_text())
    assert side["paths"] == paths and side["labels"] == labels.tolist() and side["classes"] == classes
    assert side["format"] == "ssl-embeddings/1" and side["count"] == 9 and side["dim"] == 96


def test_unlabeled_folder_has_paths_but_no_labels(world, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "u.safetensors"
    assert _embed(world, world.unlabeled, out, tmp_path / "cache", "--no-cache")["labeled"] is False
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == {"embeddings"}
        meta = f.metadata()
        embeddings = f.get_tensor("embeddings")
    expected, paths = direct_features(world.ckpt, world.unlabeled)
    assert json.loads(meta["paths"]) == paths and "nested/u1.png" in paths and json.loads(meta["classes"]) == []
    torch.testing.assert_close(embeddings, expected, rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "cache").exists()  # --no-cache wrote nothing

    _embed(world, world.unlabeled, tmp_path / "u.npy", tmp_path / "cache")
    assert json.loads((tmp_path / "u.json").read_text())["labels"] is None

    # a second run reads the cache: the backbone does not run; an earlier embed output may be replaced
    def no_backbone(*a, **k):
        raise AssertionError("the backbone ran although the features are cached")

    monkeypatch.setattr(features_module, "extract_features", no_backbone)
    assert _embed(world, world.unlabeled, tmp_path / "u.npy", tmp_path / "cache")["cached"] is True


def test_bad_inputs_are_one_line_and_overwrite_nothing(world, tmp_path: Path) -> None:
    def embed(data, out, *extra):
        return invoke("embed", world.ckpt, "--data", data, "--out", out, "--cache-dir", tmp_path / "c", *EVAL, *extra)

    user_error(embed(world.labeled, tmp_path / "x.csv"), "--out", ".safetensors or .npy")
    assert not (tmp_path / "x.csv").exists()
    user_error(embed(world.labeled, world.labeled), "--data folder")
    before = world.ckpt.read_bytes()
    user_error(embed(world.labeled, world.ckpt), "checkpoint itself")
    assert world.ckpt.read_bytes() == before
    # an export's config beside the name an .npy would use for its sidecar: kept
    config = tmp_path / "backbone.json"
    config.write_text('{"architecture": "resnet18"}')
    user_error(embed(world.labeled, tmp_path / "backbone.npy"), "backbone.json", "not an earlier ssl embed output")
    assert config.read_text() == '{"architecture": "resnet18"}' and not (tmp_path / "backbone.npy").exists()
    other = tmp_path / "weights.safetensors"
    shutil.copy(world.ckpt, other)
    user_error(embed(world.labeled, other), "not an earlier ssl embed output")
    assert other.read_bytes() == before
    (tmp_path / "folder.npy").mkdir()
    user_error(embed(world.labeled, tmp_path / "folder.npy"), "is a folder")
    user_error(embed(tmp_path / "missing", tmp_path / "y.npy"), "--data", "not a folder")
    user_error(embed(sorted(world.labeled.rglob("*.png"))[0], tmp_path / "y.npy"), "not a folder")
    missing = tmp_path / "missing.safetensors"
    user_error(
        invoke("embed", missing, "--data", world.labeled, "--out", tmp_path / "y.npy", *EVAL), "not found", str(missing)
    )
    assert not (tmp_path / "y.npy").exists() and not (tmp_path / "y.json").exists()
