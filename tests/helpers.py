"""Helpers shared by the test files: the ``ssl`` app run in-process, and what its output must look like."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from click.testing import Result
from PIL import Image
from typer.testing import CliRunner

from conftest import TINY
from ssl_cli.artifacts.backbone import load_backbone
from ssl_cli.artifacts.checkpoint import EXPORT_FORMAT
from ssl_cli.artifacts.safetensors_io import atomic_save
from ssl_cli.backbones import build_backbone
from ssl_cli.cli.app import app
from ssl_cli.config.schema import BackboneConfig
from ssl_cli.runtime import SilentReporter

# TINY as --set arguments (epochs as the --epochs flag: --set would win over it), plus a small projector
TINY_SET = [a for k, v in TINY if k != "train.epochs" for a in ("--set", f"{k}={v}")]
TINY_SET += ["--set", "method.proj_hidden_dim=64", "--set", "method.proj_output_dim=32"]
EVAL = ["--device", "cpu", "--num-workers", "0"]


def _runner() -> CliRunner:
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2: stdout and stderr are always kept apart
        return CliRunner()


def invoke(*args: str | Path, columns: int = 80) -> Result:
    """The ``ssl`` app on ``args``, stdout and stderr apart."""
    return _runner().invoke(app, [str(a) for a in args], env={"SSL_DEBUG": None, "COLUMNS": str(columns)})


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.stdout + result.stderr
    return result


def one_json(result: Result) -> dict:
    """stdout holds exactly one JSON object on one line, nothing else."""
    ok(result)
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1, result.stdout
    payload = json.loads(result.stdout)
    assert isinstance(payload, dict)
    return payload


def user_error(result: Result, *fragments: str, code: int = 2, only_line: bool = True) -> str:
    """A user error: exit ``code``, nothing on stdout, one ``error:`` line on stderr, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    if only_line:
        assert lines == errors, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def wide_invoke(*args: str | Path) -> Result:
    """``invoke`` on a 200-column terminal: tables and paths on one line each."""
    return invoke(*args, columns=200)


MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """An exported timm ``test_resnet`` (96 features) at 32x32: what ``ssl export`` writes."""
    torch.manual_seed(seed)
    model = build_backbone(BackboneConfig(name="test_resnet"))
    meta = {
        "format": EXPORT_FORMAT,
        "backbone": {"name": "test_resnet", "kwargs": {}},
        "preprocessing": {"mean": MEAN, "std": STD, "input_size": [3, 32, 32]},
    }
    atomic_save(model.state_dict(), meta, path)
    return path


def corrupt_tensors(path: Path, where: float = 0.5, count: int = 4) -> Path:
    """Flip ``count`` bytes inside the data section of a safetensors file, in place: the header (names, shapes,
    offsets, metadata) stays valid, so the file still opens; only the weights changed, as a bad disk or an edit
    would change them."""
    raw = bytearray(path.read_bytes())
    (header,) = struct.unpack("<Q", raw[:8])
    start = 8 + header
    at = start + int((len(raw) - start - count) * where)
    raw[at : at + count] = bytes(b ^ 0xFF for b in raw[at : at + count])
    path.write_bytes(bytes(raw))
    return path


def direct_features(checkpoint: Path, folder: Path) -> tuple[torch.Tensor, list[str]]:
    """Independent reference: PIL -> [0, 1] -> (x - mean) / std -> backbone, one image at a time (32x32: no resize)."""
    model = load_backbone(checkpoint)
    paths = sorted(p for p in folder.rglob("*.png"))
    rows = []
    with torch.no_grad():
        for p in paths:
            x = torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
            x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
            rows.append(model(x[None])[0])
    return torch.stack(rows), [p.relative_to(folder).as_posix() for p in paths]


class Interrupt(SilentReporter):
    """Raises Ctrl-C when epoch ``at`` has finished training but before its checkpoint is written."""

    def __init__(self, at: int) -> None:
        self.at = at

    def epoch_end(self, record: dict) -> None:
        if record["epoch"] == self.at:
            raise KeyboardInterrupt


def assert_resume_is_bit_identical(recipe, train: str, root: Path, at: int = 2) -> None:
    """A run of ``recipe`` on ``train`` interrupted after epoch ``at`` and resumed ends with the model and optimizer
    state of the uninterrupted run, bit for bit (memory banks, queues, random draws and all)."""
    from ssl_cli.artifacts.checkpoint import read_checkpoint
    from ssl_cli.train.pretrain import pretrain

    full = pretrain(recipe, train, root / "full")
    try:
        pretrain(recipe, train, root / "cut", reporter=Interrupt(at=at))
        raise AssertionError("the run was not interrupted")
    except KeyboardInterrupt:
        pass
    resumed = pretrain(recipe, train, root / "cut", resume=True)
    a, b = read_checkpoint(full.checkpoint), read_checkpoint(resumed.checkpoint)
    assert a.meta["step"] == b.meta["step"]
    for section in ("model", "optim"):
        sa, sb = a.section(section), b.section(section)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), section


def assert_torchscript_export_and_inspect(checkpoint: Path, method: str, backbone: str, num_features: int) -> None:
    """A checkpoint's TorchScript export matches the model, and ``ssl inspect --json`` names its method, backbone and
    feature width."""
    from ssl_cli.export.formats import export_model

    ts = export_model(checkpoint, Path(checkpoint).parent / "backbone.pt")
    assert ts["max_abs_diff"] <= ts["tolerance"]
    info = one_json(invoke("inspect", checkpoint, "--json"))
    assert (info["method"], info["backbone"]["name"], info["num_features"]) == (method, backbone, num_features)


def assert_drawn_for_the_global_batch(monkeypatch, module, draw: Callable[[int, int], torch.Tensor], dim: int = 0):
    """``draw(step, n)``, a method's random draw for its process's ``n`` rows, is a function of the step, and 2
    processes x 4 rows draw what 1 process x 8 draws (``module``'s ``world_size`` / ``rank`` patched). Returns the
    1-process draw of step 7."""
    one = draw(7, 8)
    assert torch.equal(one, draw(7, 8)) and not torch.equal(one, draw(8, 8))
    monkeypatch.setattr(module, "world_size", lambda: 2)
    halves = []
    for r in (0, 1):
        monkeypatch.setattr(module, "rank", lambda r=r: r)
        halves.append(draw(7, 4))
    assert torch.equal(torch.cat(halves, dim=dim), one)
    return one


def rewrite_metadata(source: Path, target: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """``target``: ``source`` with its safetensors header's metadata passed through ``change`` (JSON values decoded,
    edited in place), the tensors' bytes untouched (their hash still holds): a hand-edited or crafted file."""
    data = Path(source).read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    meta: dict[str, Any] = {}
    for key, value in header.get("__metadata__", {}).items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    change(meta)
    header["__metadata__"] = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    Path(target).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size :])
    return Path(target)


def set_key(dotted: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A ``rewrite_metadata`` change: the metadata key at ``dotted`` (``recipe.recipe.name``) becomes ``value``."""

    def change(meta: dict[str, Any]) -> None:
        *path, last = dotted.split(".")
        node = meta
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(last) if isinstance(node, list) else last] = value

    return change


def tiny_toolkit_run(root: Path, recipe) -> SimpleNamespace:
    """Two labeled folders under ``root`` (2 classes: 16 training, 8 held-out images) and ``recipe`` pretrained on
    them with the online monitors: ``root``, ``train``, ``val``, ``recipe`` and the last checkpoint ``ckpt``."""
    from conftest import write_image_folder
    from ssl_cli.train.pretrain import pretrain

    train = write_image_folder(root / "train", per_class=8, classes=2)
    val = write_image_folder(root / "val", per_class=4, classes=2, split="test")
    result = pretrain(recipe, str(train), root / "run", val=str(val))
    return SimpleNamespace(root=root, train=str(train), val=str(val), recipe=recipe, ckpt=Path(result.checkpoint))
