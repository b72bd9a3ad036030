"""The on-disk feature cache (ssl_cli.eval.cache) and its use by ``ssl knn`` / ``ssl probe``: what the key depends on,
that a second evaluation does not run the backbone, that broken entries are rebuilt, and the probe sweep's CLI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import EVAL, MEAN, STD, direct_features, one_json, tiny_checkpoint, user_error
from helpers import wide_invoke as invoke
from PIL import Image
from safetensors.torch import save_file

from conftest import write_image_folder
from ssl_cli.data import scan_folder
from ssl_cli.eval import cache as cache_module
from ssl_cli.eval import features as features_module
from ssl_cli.eval.cache import FeatureCache, default_cache_dir, feature_key, file_digest, images_fingerprint
from ssl_cli.eval.run import features, setup


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("cache")
    return SimpleNamespace(
        root=root,
        ckpt=tiny_checkpoint(root / "a.safetensors"),
        train=write_image_folder(root / "train", per_class=8, classes=3),
        val=write_image_folder(root / "val", per_class=4, classes=3, split="test"),
    )


class Counter:
    """Counts the backbone's forward calls (a forward hook on the model ``setup`` built)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        model.register_forward_hook(lambda *_: self._add())

    def _add(self) -> None:
        self.calls += 1


def _key(ckpt: Path, folder: Path, size: int = 32, mean=MEAN, random_init: bool = False) -> str:
    model_id = {"checkpoint_sha256": file_digest(ckpt), "random_init": random_init}
    return feature_key(model_id, {"size": size, "mean": mean, "std": STD}, images_fingerprint(scan_folder(folder)))


# --- the key ----------------------------------------------------------------------------------------------------


def test_key_follows_checkpoint_bytes_images_and_preprocessing_only(world, tmp_path: Path) -> None:
    base = _key(world.ckpt, world.train)
    assert _key(world.ckpt, world.train) == base  # listing the folder again: same key

    # the checkpoint's content, not its name: a copy elsewhere has the same key, other weights do not
    copy = tmp_path / "renamed.safetensors"
    shutil.copy(world.ckpt, copy)
    assert _key(copy, world.train) == base
    assert _key(tiny_checkpoint(tmp_path / "other.safetensors", seed=1), world.train) != base
    assert _key(world.ckpt, world.train, random_init=True) != base

    # preprocessing
    assert _key(world.ckpt, world.train, size=64) != base
    assert _key(world.ckpt, world.train, mean=[0.5, 0.4, 0.31]) != base

    # the image list: a copy of the folder elsewhere (other resolved paths), an added, a touched, a resized file
    folder = tmp_path / "images"
    shutil.copytree(world.train, folder)
    own = _key(world.ckpt, folder)
    assert own != base
    first = sorted(folder.rglob("*.png"))[0]
    stat = first.stat()
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = _key(world.ckpt, folder)
    assert touched != own
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _key(world.ckpt, folder) == own  # back to the same size and mtime: the same key again
    Image.open(first).resize((40, 40)).save(first)
    assert _key(world.ckpt, folder) not in (own, touched)
    shutil.copy(first, first.with_name("extra.png"))
    assert len({_key(world.ckpt, folder), own, touched}) == 3

    # images in memory (demo data): hashed by pixels and labels
    from ssl_cli.data import open_dataset

    demo = open_dataset("demo:test")
    assert images_fingerprint(demo) == images_fingerprint(open_dataset("demo:test"))
    changed = open_dataset("demo:test")
    changed.images[0, 0, 0, 0] ^= 1
    assert images_fingerprint(changed) != images_fingerprint(demo)


def test_a_backbone_read_whole_keeps_its_model_and_its_key(world, tmp_path: Path) -> None:
    """A file that is not CPC v2's (no patch-grid readout): ``load_backbone`` gives the timm model itself, its
    features are the model's on the whole image, and the key's model is what it always was (old entries stay valid;
    tests/methods/test_cpcv2.py: a CPC v2 file's key names its grid)."""
    import timm

    from ssl_cli.backbones import build_backbone
    from ssl_cli.config.schema import BackboneConfig

    s = setup(str(world.ckpt), str(world.train), str(world.val), "cpu", cache=FeatureCache(tmp_path))
    assert isinstance(s.model, timm.models.ResNet) and "readout" not in s.meta
    assert s.model_id == {"checkpoint_sha256": file_digest(world.ckpt), "random_init": False}
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(name="test_resnet")).eval()  # tiny_checkpoint's weights
    expected, _ = direct_features(world.ckpt, world.train)
    got = features(s, s.train, 8, 0)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        assert torch.equal(s.model(x), model(x))


def test_cache_dir_honours_xdg_cache_home(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "ssl" / "features"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # the XDG spec says to ignore relative paths
    assert default_cache_dir() == Path.home() / ".cache" / "ssl" / "features"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "ssl" / "features"


# --- library: hits, misses, broken entries ------------------------------------------------------------------


def _features(world, cache_dir: Path, notes: list[str]) -> tuple[torch.Tensor, torch.Tensor, Counter]:
    s = setup(str(world.ckpt), str(world.train), str(world.val), "cpu", cache=FeatureCache(cache_dir, notes.append))
    counter = Counter(s.model)
    feats, labels = features(s, s.train, 8, 0)
    return feats, labels, counter


def test_second_call_reads_the_cache_and_never_runs_the_backbone(world, tmp_path: Path) -> None:
    notes: list[str] = []
    first, labels, counter = _features(world, tmp_path, notes)
    assert counter.calls == 3  # 24 images in batches of 8
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and "extracted" in notes[-1]

    again, again_labels, counter = _features(world, tmp_path, notes)
    assert counter.calls == 0
    assert notes[-1].startswith("features: cached")
    assert torch.equal(again, first) and torch.equal(again_labels, labels)

    expected, _ = direct_features(world.ckpt, world.train)
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-5)
    assert labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8


@pytest.mark.parametrize(
    "damage",
    [
        "garbage",
        "truncated",
        "other key",
        "other labels",
        "wrong count",
    ],
)
def test_corrupt_or_stale_cache_file_is_rebuilt(world, tmp_path: Path, damage: str) -> None:
    notes: list[str] = []
    good, _, _ = _features(world, tmp_path, notes)
    (path,) = tmp_path.glob("*.safetensors")
    key = path.stem
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        labels = torch.tensor([0] * 8 + [1] * 8 + [2] * 8)
        feats, meta = good, {"format": cache_module.CACHE_FORMAT, "key": key}
        if damage == "other key":
            meta["key"] = "0" * 64
        elif damage == "other labels":
            labels = labels.flip(0)
        else:
            feats, labels = good[:5], labels[:5]
        save_file({"features": feats.contiguous(), "labels": labels.contiguous()}, str(path), metadata=meta)

    rebuilt, _, counter = _features(world, tmp_path, notes)
    assert counter.calls == 3  # extracted again, no error
    assert any("ignoring cache file" in n for n in notes)
    assert torch.equal(rebuilt, good)
    # ... and rewritten: the next call is a hit
    _, _, counter = _features(world, tmp_path, notes)
    assert counter.calls == 0 and notes[-1].startswith("features: cached")


def test_unwritable_cache_is_a_note_not_an_error(world, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    notes: list[str] = []
    feats, _, counter = _features(world, blocker / "sub", notes)
    assert counter.calls == 3 and feats.shape == (24, 96)
    assert any("cannot write the cache" in n for n in notes)


def test_a_full_disk_is_a_note_and_knn_still_answers(world, tmp_path: Path, monkeypatch) -> None:
    """safetensors reports ENOSPC as its own SafetensorError (not an OSError): still a note, a result, exit 0, and
    no temporary file left in the cache folder."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 64)  # a part was written before the disk filled up
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    cache = tmp_path / "cache"
    result = invoke(
        "knn", world.ckpt, "--train", world.train, "--val", world.val, *EVAL, "--cache-dir", cache, "--json"
    )
    assert result.exit_code == 0, result.stderr
    assert "top1" in one_json(result) and "cannot write the cache" in result.stderr
    assert "No space left on device" in result.stderr
    assert not [p for p in cache.rglob("*") if p.is_file()]


# --- CLI ----------------------------------------------------------------------------------------------------------


def test_knn_then_probe_reuse_the_cache(world, tmp_path: Path, monkeypatch) -> None:
    args = [world.ckpt, "--train", world.train, "--val", world.val, "--cache-dir", tmp_path, "--json", *EVAL]
    first = invoke("knn", *args, "--k", "3", "--k", "5")
    assert "features: cached" not in first.stderr
    cold = one_json(first)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # train and val

    def no_backbone(*a, **k):
        raise AssertionError("the backbone ran although the features are cached")

    monkeypatch.setattr(features_module, "extract_features", no_backbone)
    second = invoke("knn", *args, "--k", "3", "--k", "5")
    assert second.stderr.count("features: cached") == 2
    assert one_json(second)["by_k"] == cold["by_k"]
    probe = invoke("probe", *args, "--epochs", "2")
    assert probe.stderr.count("features: cached") == 2 and one_json(probe)["epochs"] == 2

    # --no-cache: extracts afresh, reads and writes no cache
    monkeypatch.undo()
    empty = tmp_path / "none"
    no_cache = [world.ckpt, "--train", world.train, "--val", world.val, "--cache-dir", empty, "--no-cache", *EVAL]
    uncached = one_json(invoke("knn", *no_cache, "--json", "--k", "3"))
    assert uncached["by_k"]["3"] == cold["by_k"]["3"] and not empty.exists()


def test_knn_dtype_option(world, tmp_path: Path) -> None:
    args = [world.ckpt, "--train", world.train, "--val", world.val, "--cache-dir", tmp_path, "--json", *EVAL]
    assert one_json(invoke("knn", *args))["dtype"] == "float32"  # auto: a small bank stays float32
    half = one_json(invoke("knn", *args, "--dtype", "float16"))
    assert half["dtype"] == "float16" and 0 <= half["top1"] <= 1
    user_error(invoke("knn", *args, "--dtype", "int8"), "--dtype int8", "float16")


def test_probe_sweep_json_and_table(world, tmp_path: Path) -> None:
    args = [world.ckpt, "--train", world.train, "--val", world.val, "--cache-dir", tmp_path, *EVAL, "--epochs", "3"]
    sweep = ["--lr", "0.01", "--lr", "1", "--weight-decay", "0", "--weight-decay", "0.001"]
    payload = one_json(invoke("probe", *args, *sweep, "--holdout-fraction", "0.25", "--json"))
    pairs = [(h["lr"], h["weight_decay"]) for h in payload["sweep"]]
    assert pairs == [(0.01, 0.0), (0.01, 0.001), (1.0, 0.0), (1.0, 0.001)]
    assert payload["holdout_size"] == 6 and payload["train_size"] == 18  # 2 of every class's 8 held out
    chosen = [h for h in payload["sweep"] if h["selected"]]
    assert len(chosen) == 1 and (payload["lr"], payload["weight_decay"]) == (chosen[0]["lr"], chosen[0]["weight_decay"])
    assert chosen[0]["holdout_top1"] == max(h["holdout_top1"] for h in payload["sweep"])
    assert payload["selected_on"] == "holdout" and 0 <= payload["top1"] <= payload["top5"] <= 1

    # the default holdout with several pairs is 0.1 (here: one image of each class of 8, rounding 0.8 up)
    default = one_json(invoke("probe", *args, *sweep, "--json"))
    assert default["holdout_fraction"] == 0.1 and default["holdout_size"] == 3

    table = invoke("probe", *args, *sweep)
    assert table.exit_code == 0 and "chosen" in table.stdout and "holdout top1" in table.stdout


def test_probe_bad_options_are_one_line(world, tmp_path: Path) -> None:
    args = [world.ckpt, "--train", world.train, "--val", world.val, "--cache-dir", tmp_path, *EVAL, "--epochs", "1"]
    user_error(invoke("probe", *args, "--lr", "0.1", "--lr", "1", "--augment"), "--augment", "one --lr")
    user_error(invoke("probe", *args, "--lr", "0.1", "--lr", "1", "--holdout-fraction", "0"), "--holdout-fraction 0")
    user_error(invoke("probe", *args, "--holdout-fraction", "1"), "--holdout-fraction 1", "[0, 1)")
    user_error(invoke("probe", *args, "--holdout-fraction", "0.01"), "holds out no image")
    user_error(invoke("probe", *args, "--lr", "0"), "--lr 0", "> 0")
    user_error(invoke("probe", *args, "--weight-decay", "-1"), "--weight-decay -1")


def test_augmented_probe_reads_val_from_the_cache_and_decodes_train(world, tmp_path: Path) -> None:
    args = [world.ckpt, "--train", world.train, "--val", world.val, "--cache-dir", tmp_path, *EVAL, "--epochs", "1"]
    one_json(invoke("knn", *args[:-2], "--json"))  # fills the cache for both splits
    result = invoke("probe", *args, "--augment", "--json")
    assert result.stderr.count("features: cached") == 1  # val only: train is seen as augmented images
    payload = one_json(result)
    assert payload["augment"] is True and 0 <= payload["top1"] <= payload["top5"] <= 1
