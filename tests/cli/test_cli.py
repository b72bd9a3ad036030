"""The ``ssl`` command line: JSON on stdout, progress on stderr, one-line errors with exit code 2."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import EVAL, TINY_SET, invoke, ok, one_json, user_error
from rich.console import Console

import ssl_cli
import ssl_cli.cli.console as console
from conftest import write_image_folder
from ssl_cli.artifacts.checkpoint import read_checkpoint
from ssl_cli.config import load_recipe


def _bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """Labeled train / val folders and one tiny 2-epoch ``ssl pretrain --json`` run, shared by the tests."""
    root = tmp_path_factory.mktemp("cli")
    train = write_image_folder(root / "train", per_class=32, classes=4)
    val = write_image_folder(root / "val", per_class=6, classes=4, split="test")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = invoke(
            "pretrain",
            "--recipe",
            "simclr",
            "--data",
            train,
            "--out",
            root / "run",
            "--epochs",
            "2",
            "--json",
            *TINY_SET,
        )
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(
        root=root,
        train=train,
        val=val,
        run=root / "run",
        result=result,
        ckpt=root / "run" / "checkpoints" / "last.safetensors",
    )


# --- basics -----------------------------------------------------------------------------------------------


def test_version() -> None:
    result = ok(invoke("--version"))
    assert result.stdout == f"ssl {ssl_cli.__version__}\n"


def test_recipes_list_json() -> None:
    payload = one_json(invoke("recipes", "list", "--json"))
    rows = {row["name"]: row for row in payload["recipes"]}
    assert {"simclr", "simclr-cifar", "mocov2", "mocov2-cifar"} <= set(rows)
    for name, row in rows.items():
        assert row["description"].strip(), name
        assert row["method"] == load_recipe(name).method.name
    assert rows["simclr-cifar"]["method"] == "simclr" and rows["mocov2-cifar"]["method"] == "mocov2"


def test_recipes_show_round_trips_and_trains(world, tmp_path: Path) -> None:
    result = ok(invoke("recipes", "show", "mocov2"))
    assert result.stderr == ""
    saved = tmp_path / "my.toml"
    saved.write_text(result.stdout)

    def without_name(recipe) -> dict:
        d = recipe.to_dict()
        d["recipe"].pop("name", None)
        return d

    assert without_name(load_recipe(str(saved))) == without_name(load_recipe("mocov2"))

    run = tmp_path / "run"
    tiny_moco = ["--set", "method.queue_size=64", "--set", "method.shuffle_bn_splits=2"]
    result = ok(
        invoke(
            "pretrain",
            "--recipe",
            saved,
            "--set",
            "optim.lr=0.06",
            "--data",
            world.train,
            "--out",
            run,
            "--quiet",
            "--epochs",
            "1",
            *TINY_SET,
            *tiny_moco,
        )
    )
    used = load_recipe(str(run / "recipe.toml"))
    assert used.optim.lr == 0.06
    assert used.method.name == "mocov2" and used.method.queue_size == 64
    assert used.method.temperature == load_recipe("mocov2").method.temperature
    assert read_checkpoint(run / "checkpoints" / "last.safetensors").recipe == used


# --- pretrain ---------------------------------------------------------------------------------------------


def test_pretrain_json_and_run_folder(world) -> None:
    payload = one_json(world.result)
    assert Path(payload["checkpoint"]) == world.ckpt and world.ckpt.is_file()
    assert Path(payload["run_dir"]) == world.run
    assert payload["epochs"] == 2 and payload["steps"] == 2 * (128 // 32)
    assert payload["loss"] > 0 and payload["images_per_second"] > 0

    # progress and log lines went to stderr only
    stderr = world.result.stderr
    assert f"run folder: {world.run}" in stderr
    assert "epoch 1/2" in stderr and "epoch 2/2" in stderr
    assert "loss" not in world.result.stdout.replace('"loss"', "")

    names = {p.name for p in world.run.iterdir()}
    assert {"recipe.toml", "metrics.jsonl", "checkpoints"} <= names
    assert {p.name for p in (world.run / "checkpoints").iterdir()} == {
        "last.safetensors",
        "epoch_0001.safetensors",
        "epoch_0002.safetensors",
    }
    records = [json.loads(line) for line in (world.run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert r["loss"] > 0 and r["lr"] > 0 and r["images_per_second"] > 0

    recipe = load_recipe(str(world.run / "recipe.toml"))
    assert recipe.backbone.name == "test_resnet" and recipe.train.epochs == 2 and recipe.recipe.name == "simclr"
    assert read_checkpoint(world.ckpt).recipe == recipe
    assert read_checkpoint(world.run / "checkpoints" / "epoch_0001.safetensors").meta["epoch"] == 1


def test_a_folder_with_anything_of_a_run_is_never_taken_for_a_new_run(world, tmp_path: Path) -> None:
    """Metrics, an epoch checkpoint (no ``last``) or another recipe: refused, nothing touched. Only the same recipe
    alone (an attempt stopped before its first checkpoint) is started again."""
    args = ["pretrain", "--recipe", "simclr", "--data", world.val, "--quiet", "--epochs", "1", *TINY_SET]
    args += ["--set", "train.batch_size=24"]
    metrics = tmp_path / "metrics-only"
    metrics.mkdir()
    (metrics / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "loss": 9.9}) + "\n")
    epoch_only = tmp_path / "epoch-only"
    shutil.copytree(world.run, epoch_only)
    (epoch_only / "checkpoints" / "last.safetensors").unlink()  # e.g. deleted after it was found corrupt
    for run, shown in [(metrics, "metrics.jsonl"), (epoch_only, "checkpoints/epoch_0001.safetensors")]:
        before = _bytes(run)
        user_error(invoke(*args, "--out", run), f"already holds a run ({shown}", "--resume", only_line=False)
        assert _bytes(run) == before
    hint = invoke("pretrain", "--out", epoch_only, "--resume", "--quiet")
    user_error(hint, "copy it to last.safetensors to resume from it", only_line=False)
    # an attempt stopped before its first checkpoint: only its recipe.toml, the same recipe -> starts again
    same = tmp_path / "same"
    ok(invoke(*args, "--out", same, "--set", "train.epochs=1"))
    shutil.rmtree(same / "checkpoints")
    (same / "metrics.jsonl").unlink()
    ok(invoke(*args, "--out", same, "--set", "train.epochs=1"))
    assert (same / "checkpoints" / "last.safetensors").is_file()
    shutil.rmtree(same / "checkpoints")
    (same / "metrics.jsonl").unlink()
    other = invoke(*args, "--out", same, "--set", "optim.lr=0.5")
    user_error(other, "already holds a run (recipe.toml)", only_line=False)


# --- evaluation and export --------------------------------------------------------------------------------


def _fraction(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_knn_json_several_k(world) -> None:
    payload = one_json(
        invoke("knn", world.ckpt, "--train", world.train, "--val", world.val, "--json", "--k", "5", "--k", "10", *EVAL)
    )
    assert _fraction(payload["top1"]) and _fraction(payload["top5"])
    assert payload["k"] == 5 and payload["random_init"] is False
    assert set(payload["by_k"]) == {"5", "10"}
    for v in payload["by_k"].values():
        assert _fraction(v["top1"]) and _fraction(v["top5"]) and v["top1"] <= v["top5"]
    assert payload["top1"] == payload["by_k"]["5"]["top1"]
    assert payload["by_k"]["5"]["top5"] == 1.0  # four classes: the true one is always among the top five


def test_knn_random_init_and_exported_backbone(world, tmp_path: Path) -> None:
    args = ["--train", world.train, "--val", world.val, "--json", "--k", "5", *EVAL]
    payload = one_json(invoke("knn", world.ckpt, *args, "--random-init"))
    assert payload["random_init"] is True and _fraction(payload["top1"])

    exported = tmp_path / "b.safetensors"
    ok(invoke("export", world.ckpt, "--out", exported, "--json"))
    from_export = one_json(invoke("knn", exported, *args))
    from_ckpt = one_json(invoke("knn", world.ckpt, *args))
    assert from_export["by_k"] == from_ckpt["by_k"]


@pytest.mark.parametrize("command", ["linear-probe", "probe"])
def test_linear_probe_json(world, command: str) -> None:
    payload = one_json(
        invoke(command, world.ckpt, "--train", world.train, "--val", world.val, "--epochs", "2", "--json", *EVAL)
    )
    assert _fraction(payload["top1"]) and _fraction(payload["top5"]) and payload["top1"] <= payload["top5"]
    assert payload["epochs"] == 2 and payload["random_init"] is False


def test_linear_probe_random_init(world) -> None:
    payload = one_json(
        invoke(
            "linear-probe",
            world.ckpt,
            "--train",
            world.train,
            "--val",
            world.val,
            "--epochs",
            "2",
            "--json",
            "--random-init",
            *EVAL,
        )
    )
    assert payload["random_init"] is True and _fraction(payload["top1"]) and _fraction(payload["top5"])


def test_export_json(world, tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    payload = one_json(invoke("export", world.ckpt, "--out", out, "--json"))
    assert payload["backbone"] == str(out) and out.is_file()
    assert payload["config"] == str(tmp_path / "x.json") and (tmp_path / "x.json").is_file()
    assert payload["architecture"] == "test_resnet" and payload["small_stem"] is False
    assert payload["num_features"] == ssl_cli.load_backbone(str(out)).num_features

    # without --json: a table on stdout, the timm hint on stderr
    result = ok(invoke("export", world.ckpt, "--out", tmp_path / "y.safetensors"))
    assert "test_resnet" in result.stdout
    assert "timm.create_model('test_resnet'" in result.stderr


# --- errors -----------------------------------------------------------------------------------------------


def test_unknown_recipe_lists_valid_ones(world, tmp_path: Path) -> None:
    line = user_error(
        invoke("pretrain", "--recipe", "nope", "--data", world.train, "--out", tmp_path / "r"), "unknown recipe 'nope'"
    )
    for name in ("simclr", "simclr-cifar", "mocov2", "mocov2-cifar"):
        assert name in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "assignment, fragments",
    [
        ("optim.lrr=1", ["unknown key 'optim.lrr'", "lr"]),
        ("optim.lr=abc", ["optim.lr", "abc"]),
        ("train.epochs=0", ["train.epochs", "greater than or equal to 1"]),
        ("optim.lr", ["KEY=VALUE"]),
        # blamed on the built-in recipe file before (simclr.toml: unknown key '' / views.0.size)
        (".lr=1", ["--set .lr: an empty name between dots"]),
        ("optim..lr=1", ["--set optim..lr: an empty name between dots"]),
        ("views.*.size=abc", ["--set views.*.size: views.0.size: Input should be a valid integer"]),
    ],
)
def test_bad_set_override(world, tmp_path: Path, assignment: str, fragments: list[str]) -> None:
    result = invoke(
        "pretrain", "--recipe", "simclr", "--data", world.train, "--out", tmp_path / "r", "--set", assignment
    )
    user_error(result, "--set", *fragments)
    assert not (tmp_path / "r").exists()


def test_unknown_method_in_recipe_file(world, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[method]\nname = "x"\n')
    user_error(
        invoke("pretrain", "--recipe", bad, "--data", world.train, "--out", tmp_path / "r"),
        str(bad),
        "unknown method 'x'; valid: ",
        "mocov2",
        "simclr",
    )


def test_recipe_file_not_found_and_invalid_toml(world, tmp_path: Path) -> None:
    user_error(invoke("pretrain", "--recipe", tmp_path / "missing.toml", "--data", world.train), "not found")
    broken = tmp_path / "broken.toml"
    broken.write_text("[method\nname = \n")
    user_error(invoke("pretrain", "--recipe", broken, "--data", world.train), "invalid TOML")
    user_error(invoke("recipes", "show", "nope"), "unknown recipe 'nope'")


def test_a_missing_extends_target_is_blamed_on_the_file_that_extends_it(world, tmp_path: Path) -> None:
    mine = tmp_path / "mine.toml"
    mine.write_text('extends = "simclr-cifr"\n')
    result = invoke("pretrain", "--recipe", mine, "--data", world.train, "--out", tmp_path / "r")
    user_error(result, f"{mine}: extends = 'simclr-cifr': unknown recipe 'simclr-cifr'; valid: ", "simclr-cifar")
    assert not (tmp_path / "r").exists()


def test_a_bad_image_decoded_in_a_loader_worker_is_one_line(tmp_path: Path) -> None:
    """data.cache = "none": images are decoded in DataLoader workers, whose traceback was the error line."""
    data = write_image_folder(tmp_path / "data", per_class=16, classes=2)
    bad = sorted(data.rglob("*.png"))[5]
    bad.write_bytes(bad.read_bytes()[:100])
    workers = ["--set", "data.cache=none", "--set", "data.num_workers=1", "--quiet"]
    result = invoke("pretrain", "--recipe", "simclr", "--data", data, "--out", tmp_path / "r", *TINY_SET, *workers)
    line = user_error(result, f"error: cannot decode image {bad}: image file is truncated")
    assert line.endswith("truncated") and "Traceback" not in line


def test_missing_data_folder(tmp_path: Path) -> None:
    result = invoke("pretrain", "--recipe", "simclr", "--data", tmp_path / "nope", "--out", tmp_path / "r", *TINY_SET)
    user_error(result, "not found", str(tmp_path / "nope"), only_line=False)
    result = invoke(
        "pretrain", "--recipe", "simclr", "--data", tmp_path / "nope", "--out", tmp_path / "r", "--quiet", *TINY_SET
    )
    user_error(result, "not found")
    assert not (tmp_path / "r").exists()


def test_knn_on_unlabeled_folder(world, tmp_path: Path) -> None:
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for png in sorted(world.val.rglob("*.png"))[:4]:
        shutil.copy(png, unlabeled / png.name)
    user_error(
        invoke("knn", world.ckpt, "--train", unlabeled, "--val", world.val, "--json", *EVAL), "--train", "labels"
    )
    user_error(
        invoke("linear-probe", world.ckpt, "--train", world.train, "--val", unlabeled, "--json", *EVAL),
        "--val",
        "labels",
    )


@pytest.mark.parametrize("command", ["knn", "linear-probe", "probe", "export"])
def test_checkpoint_that_does_not_exist(world, tmp_path: Path, command: str) -> None:
    missing = tmp_path / "missing.safetensors"
    extra = (
        ["--out", tmp_path / "o.safetensors"] if command == "export" else ["--train", world.train, "--val", world.val]
    )
    user_error(invoke(command, missing, *extra, "--json"), "not found", str(missing))


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b'\x08\x00\x00\x00\x00\x00\x00\x00{"a": 1}'])
@pytest.mark.parametrize("command", ["knn", "export"])
def test_garbage_file_as_checkpoint(world, tmp_path: Path, command: str, content: bytes) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(content)
    extra = (
        ["--out", tmp_path / "o.safetensors"] if command == "export" else ["--train", world.train, "--val", world.val]
    )
    user_error(invoke(command, garbage, *extra, "--json"), str(garbage))
    assert garbage.read_bytes() == content
    assert not (tmp_path / "o.safetensors").exists()


def test_export_bad_out(world, tmp_path: Path) -> None:
    before = world.ckpt.read_bytes()
    user_error(invoke("export", world.ckpt, "--out", tmp_path / "x.pth"), ".safetensors")
    user_error(invoke("export", world.ckpt, "--out", world.ckpt), "checkpoint itself")
    assert world.ckpt.read_bytes() == before


def test_pretrain_refuses_a_run_folder_with_checkpoints(world, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    before = _bytes(run)
    result = invoke(
        "pretrain", "--recipe", "simclr", "--data", world.train, "--out", run, "--set", "optim.lr=0.5", *TINY_SET
    )
    user_error(result, "already holds a run (checkpoints/", "--resume", only_line=False)
    assert _bytes(run) == before  # checkpoints, recipe.toml and metrics.jsonl untouched


def test_resume_needs_out_and_a_checkpoint(tmp_path: Path) -> None:
    user_error(invoke("pretrain", "--recipe", "simclr", "--resume"), "--resume", "--out")
    user_error(invoke("pretrain", "--resume", "--out", tmp_path / "empty"), "no checkpoint to resume")
    user_error(invoke("pretrain"), "--recipe")


def test_transfer_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    user_error(
        invoke("transfer", tmp_path / "some.safetensors", "--out", tmp_path / "ft", "--quiet"), "some.safetensors"
    )


def test_usage_errors_exit_2_without_traceback() -> None:
    result = invoke("pretrain", "--recipe", "simclr", "--epochs", "0")
    assert result.exit_code == 2 and "Traceback" not in result.stdout + result.stderr
    assert "--epochs" in result.stderr and result.stdout == ""


def test_internal_errors_are_one_line_exit_1(world, tmp_path: Path, monkeypatch) -> None:
    import ssl_cli.export.backbone as export_lib

    def boom(*_args, **_kwargs):
        raise RuntimeError("something broke\nwith a second line")

    monkeypatch.setattr(export_lib, "export_backbone", boom)
    line = user_error(invoke("export", world.ckpt, "--out", tmp_path / "x.safetensors"), "internal error", code=1)
    assert "RuntimeError" in line and "SSL_DEBUG" in line


def test_error_line_on_a_terminal_is_one_line_and_not_markup(monkeypatch) -> None:
    buffer = io.StringIO()
    monkeypatch.setattr(console, "err", Console(file=buffer, force_terminal=True, color_system=None, width=40))
    message = "recipe: missing table [method] with a 'name' " + "x" * 80
    exit_ = console.fail(message)
    assert exit_.exit_code == 2
    assert buffer.getvalue() == f"error: {message}\n"


# --- resume -----------------------------------------------------------------------------------------------


def test_resume_an_interrupted_run(world, tmp_path: Path) -> None:
    """A run cut after epoch 1 continues from the run folder alone and ends where the full run did."""
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    checkpoints = run / "checkpoints"
    full = read_checkpoint(world.ckpt)  # (not the copy: loaded tensors map the file, which is overwritten next)
    (checkpoints / "epoch_0002.safetensors").unlink()
    shutil.copy(checkpoints / "epoch_0001.safetensors", checkpoints / "last.safetensors")

    result = invoke("pretrain", "--out", run, "--resume", "--json")  # recipe and data come from the run folder
    payload = one_json(result)
    assert "resuming" in result.stderr and "epoch 2/2" in result.stderr and "epoch 1/2" not in result.stderr
    assert payload["epochs"] == 2 and payload["steps"] == full.meta["step"]

    resumed = read_checkpoint(checkpoints / "last.safetensors")
    assert resumed.meta["epoch"] == 2 and resumed.meta["step"] == full.meta["step"]
    for key, value in full.section("model").items():
        assert torch.equal(resumed.section("model")[key], value), key
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert (checkpoints / "epoch_0002.safetensors").is_file()


def test_resume_a_finished_run_changes_nothing(world, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    before = _bytes(run)
    payload = one_json(invoke("pretrain", "--out", run, "--resume", "--json"))
    assert (
        payload["epochs"] == 2
        and payload["steps"] == read_checkpoint(run / "checkpoints/last.safetensors").meta["step"]
    )
    # nothing was trained: the result reports the finished run's last epoch
    assert payload["loss"] == read_checkpoint(run / "checkpoints/last.safetensors").meta["metrics"]["loss"]
    assert payload["images_per_second"] is None
    assert _bytes(run) == before


def test_resume_with_a_changed_recipe_is_refused(world, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    before = _bytes(run)
    result = invoke("pretrain", "--out", run, "--resume", "--epochs", "3", "--quiet")
    user_error(result, "different recipe", "train.epochs: 2 then, 3 now")
    assert _bytes(run) == before


# --- the installed console script -------------------------------------------------------------------------


def _ssl(*commands: list) -> list[subprocess.CompletedProcess]:
    """Run ``ssl`` command lines side by side (each start imports torch: seconds)."""
    exe = shutil.which("ssl")
    prefix = [exe] if exe else [sys.executable, "-m", "ssl_cli"]
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_DEBUG", "COLUMNS", "FORCE_COLOR")}
    procs = [
        subprocess.Popen([*prefix, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for args in commands
    ]
    results = []
    for args, proc in zip(commands, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    return results


def test_console_script(world, tmp_path: Path) -> None:
    out = tmp_path / "exported.safetensors"
    # a long message stays one line even off a terminal (no wrapping at 80 columns)
    missing = tmp_path / ("a-rather-long-folder-name-" * 3) / "missing.safetensors"
    version, export, error = _ssl(
        ["--version"],
        ["export", world.ckpt, "--out", out, "--json"],
        ["knn", missing, "--train", world.train, "--val", world.val],
    )
    assert version.returncode == 0 and version.stdout == f"ssl {ssl_cli.__version__}\n" and version.stderr == ""

    assert export.returncode == 0, export.stderr
    assert json.loads(export.stdout)["backbone"] == str(out) and export.stdout.count("\n") == 1 and out.is_file()

    assert error.returncode == 2 and error.stdout == "" and "Traceback" not in error.stderr
    assert error.stderr.splitlines() == [f"error: checkpoint not found: {missing}"]


def test_progress_lines_are_printed_when_stderr_is_not_a_terminal(capsys) -> None:
    reporter = console.ProgressReporter(epochs=2)
    reporter.LOG_INTERVAL_S = 0.0
    with reporter:
        reporter.start(total_steps=10, done_steps=0)
        reporter.update(4, 0, {"loss": 1.25, "lr": 0.1, "images_per_second": 50.0})
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "epoch 1/2  step 4/10  loss 1.2500  lr 0.1  50 img/s  ETA" in captured.err
