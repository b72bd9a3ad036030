"""Crafted or hand-edited metadata in a checkpoint or export (a number where a name is, a string where a table is):
every command that reads the file says so in one line naming the file and the key (it was an ``internal error``),
and a run folder is left as it was."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import EVAL, invoke, rewrite_metadata, set_key, user_error

from conftest import TINY, write_image_folder
from ssl_cli.artifacts.backbone import load_backbone
from ssl_cli.artifacts.checkpoint import read_checkpoint
from ssl_cli.artifacts.metadata import check_metadata
from ssl_cli.config import load_recipe
from ssl_cli.errors import CheckpointError
from ssl_cli.export.backbone import export_backbone
from ssl_cli.export.inspect import describe
from ssl_cli.train.pretrain import pretrain


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    """SimCLR on test_resnet, one epoch of one step on 32 images, and its export."""
    root = tmp_path_factory.mktemp("metadata")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test thread limit
    try:
        data = write_image_folder(root / "data", per_class=16, classes=2)
        small = [("method.proj_hidden_dim", 16), ("method.proj_output_dim", 8)]
        ckpt = Path(pretrain(load_recipe("simclr", [*TINY, *small]), str(data), root / "run").checkpoint)
        export_backbone(ckpt, root / "export.safetensors")
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(root=root, data=data, ckpt=ckpt, export=root / "export.safetensors")


# (the file, the key, the crafted value, the key the error names); an export keeps its training under "source"
CASES = [
    ("ckpt", "recipe.recipe.name", 12, "recipe.recipe.name"),
    ("ckpt", "backbone", "resnet", "backbone"),
    ("ckpt", "recipe", "simclr", "recipe"),
    ("ckpt", "recipe.backbone", "resnet18", "recipe.backbone"),
    ("ckpt", "preprocessing", "imagenet", "preprocessing"),
    ("ckpt", "preprocessing.mean", "x", "preprocessing.mean"),
    ("ckpt", "step", "ten", "step"),
    ("ckpt", "data", "cifar10", "data"),
    ("ckpt", "data.classes", 5, "data.classes"),
    ("ckpt", "metrics", [1], "metrics"),
    ("ckpt", "metrics.loss", "low", "metrics.loss"),
    ("ckpt", "method", 5, "method"),
    ("ckpt", "ssl_version", 5, "ssl_version"),
    ("export", "backbone", "resnet", "backbone"),
    ("export", "backbone.kwargs", "depth=4", "backbone.kwargs"),
    ("export", "preprocessing", "imagenet", "preprocessing"),
    ("export", "preprocessing.input_size", [3, "a", 32], "preprocessing.input_size.1"),
    ("export", "source.recipe.recipe.name", 12, "source.recipe.recipe.name"),
    ("export", "source.data", "x", "source.data"),
    ("export", "source.metrics.loss", "low", "source.metrics.loss"),
    ("export", "config", "x", "config"),
]


@pytest.mark.parametrize(("which", "key", "value", "named"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_crafted_metadata_is_one_line_in_every_command(run, which, key, value, named, tmp_path: Path) -> None:
    bad = rewrite_metadata(getattr(run, which), tmp_path / "bad.safetensors", set_key(key, value))
    fragments = (str(bad), f"metadata {named}")
    user_error(invoke("inspect", bad), *fragments)
    user_error(invoke("knn", bad, "--train", run.data, "--val", run.data, *EVAL, "--no-cache", "--k", "3"), *fragments)
    out = tmp_path / "out.safetensors"
    user_error(invoke("export", bad, "--out", out), *fragments)
    assert not out.exists()
    with pytest.raises(CheckpointError, match=f"metadata {named}"):
        load_backbone(bad)
    if which == "ckpt":
        with pytest.raises(CheckpointError, match=f"metadata {named}"):
            read_checkpoint(bad)


@pytest.mark.parametrize(
    ("key", "value"), [("recipe.recipe.name", 12), ("recipe", "simclr"), ("data", "x"), ("optim_groups", [{}])]
)
def test_resume_from_crafted_metadata_is_one_line_and_the_run_is_kept(run, key, value, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    shutil.copytree(run.ckpt.parent.parent, folder)
    last = folder / "checkpoints" / "last.safetensors"
    rewrite_metadata(last, last, set_key(key, value))
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    user_error(invoke("pretrain", "--resume", "--out", folder, "--epochs", "2"), str(last), f"metadata {key}")
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_an_export_with_a_crafted_projector_is_one_line(run, tmp_path: Path) -> None:
    layers = [{"type": "linear", "in": "96", "out": 8, "bias": True}]
    projector = {"layers": layers, "num_layers": 1, "num_features": 8}
    bad = rewrite_metadata(run.export, tmp_path / "bad.safetensors", set_key("projector", projector))
    with pytest.raises(CheckpointError, match=r"metadata projector.layers.0.in: Input should be a valid integer"):
        load_backbone(bad)
    projector["layers"] = [{"type": "batchnorm", "dim": 8}]
    rewrite_metadata(run.export, bad, set_key("projector", projector))
    with pytest.raises(CheckpointError, match=r"metadata projector.layers.0: a batchnorm layer needs affine, eps"):
        describe(bad)


def test_real_files_pass_and_null_tables_or_huge_sizes_do_not() -> None:
    meta = {"format": "ssl-backbone/1", "backbone": {"name": "test_resnet", "kwargs": {}}}
    assert check_metadata(meta, "f") is meta  # nothing else is required: ImageNet statistics stand in
    for change, match in [
        ({"backbone": None}, r"^f: metadata backbone: must be a table \(got None\)$"),
        ({"preprocessing": {"input_size": [3, 10**12, 32]}}, r"input_size.1: Input should be less than or equal"),
        ({"preprocessing": {"std": [1, 0, 1]}}, r"preprocessing.std.1: Input should be greater than 0"),
        ({"epoch": -1}, r"metadata epoch: Input should be greater than or equal to 0"),
        ({"optim_scalars": {"lr": 1}}, r"metadata optim_scalars: keys must be 'INDEX.NAME'"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            check_metadata({**meta, **change}, "f")
    with pytest.raises(CheckpointError, match=r"^f: metadata lacks 'backbone'"):
        check_metadata({"format": "ssl-backbone/1"}, "f")
