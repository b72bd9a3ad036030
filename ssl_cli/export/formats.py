"""``ssl export --format``: the backbone as safetensors, TorchScript, ONNX or a Hugging Face-style folder.

``export_model(ckpt, out, fmt)`` writes one format and then checks it: the file is loaded back with the
runtime it is meant for (``ssl_cli.load_backbone``, ``torch.jit.load``, onnxruntime, timm's ``local-dir:``)
and its features on a fixed random batch are compared with the PyTorch model's. A batch size other than
the one used to export is checked too, so a batch axis that was frozen while tracing is caught. A file that
fails the check is deleted and the command fails; nothing is left under the requested name.

- ``torchscript``: ``torch.jit.script`` (``torch.jit.trace`` where scripting fails), saved with
  ``torch.jit.save``. Input N x 3 x H x W float32 (normalised as ``preprocessing`` says), output N x D.
- ``onnx``: ``torch.onnx.export`` with the ``torch.export``-based exporter (needs ``onnxscript``), opset
  18, a dynamic batch axis, input ``images``, output ``features``. Where that exporter fails, torch's older
  TorchScript-based one is tried.
- ``hf``: a folder in timm's Hugging Face hub layout (``ssl_cli.export.hf``).
- ``safetensors``: ``ssl_cli.export.backbone.export_backbone`` (timm keys + ``.json`` config), checked too.

A CPC v2 checkpoint's model is its image feature, the mean of the encoder's pooled features over the patch grid
(``ssl_cli.artifacts.readout``): TorchScript and ONNX hold that whole readout (input N x 3 x S x S at the training
size, the grid cut inside); safetensors and hf hold the timm weights of the patch encoder, with the grid in their
metadata (``readout``), so ``ssl_cli.load_backbone`` gives the image feature again and timm the patch encoder; the
hf check compares timm's model with the patch encoder and ``ssl_cli.load_backbone(folder)`` with the readout.

The ``ssl`` metadata (backbone, preprocessing, how it was trained) travels inside every format: the
safetensors header, a ``ssl.json`` extra file in the TorchScript archive, ``metadata_props["ssl"]`` in
the ONNX model; ``ssl inspect`` reads it back.

Everything is written into a temporary folder beside ``out`` first, checked there, then moved into place
with ``os.replace``: an interrupted or failed export never leaves a broken file, and an existing output is
replaced only by a checked one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ssl_cli.export.backbone as base
from ssl_cli.artifacts.atomic import (
    DiskFull,
    disk_full_message,
    is_disk_full,
    remove_dead_temporaries,
    temporary_prefix,
)
from ssl_cli.artifacts.backbone import HF_WEIGHTS, load_backbone
from ssl_cli.errors import CheckpointError
from ssl_cli.export import hf
from ssl_cli.export.backbone import PreparedExport, prepare_export
from ssl_cli.export.checks import check_batch, compare

FORMATS = ("safetensors", "torchscript", "onnx", "hf")
SUFFIXES = {".safetensors": "safetensors", ".pt": "torchscript", ".torchscript": "torchscript", ".onnx": "onnx"}
DEFAULT_OUT = {
    "safetensors": "backbone.safetensors",
    "torchscript": "backbone.pt",
    "onnx": "backbone.onnx",
    "hf": "backbone",
}
ONNX_OPSET = 18
ONNX_INPUT, ONNX_OUTPUT = "images", "features"
TORCHSCRIPT_META = "ssl.json"
"""The extra file in a TorchScript archive that holds the export's metadata."""
EXPORT_BATCH = 2
ONNX_INSTALL = "pip install 'ssl-cli[onnx]' (or: pip install onnx onnxscript onnxruntime)"


def _suffix_list() -> str:
    return ".safetensors, .pt / .torchscript (TorchScript), .onnx, or a folder (hf)"


def resolve_format(fmt: str | None, out: str | Path | None) -> tuple[str, Path]:
    """The format and output path from ``--format`` and ``--out``; either may be missing, not both wrong."""
    if fmt is not None:
        fmt = fmt.strip().lower()
        if fmt not in FORMATS:
            raise CheckpointError(f"--format {fmt}: unknown format; valid: {', '.join(FORMATS)}")
    if out is None or str(out) == "":
        return fmt or "safetensors", Path(DEFAULT_OUT[fmt or "safetensors"])
    raw = str(out)
    path = Path(raw).expanduser()
    folder = raw.endswith(("/", os.sep)) or path.suffix == ""
    inferred = "hf" if folder else SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        if inferred is None:
            raise CheckpointError(
                f"--out {raw}: cannot tell the format from the suffix '{path.suffix}'; use {_suffix_list()}, "
                "or give --format"
            )
        return inferred, path
    if fmt == "hf":
        if not folder and path.suffix.lower() in SUFFIXES:
            raise CheckpointError(
                f"--format hf writes a folder, but --out {raw} names a '{path.suffix}' file "
                f"({SUFFIXES[path.suffix.lower()]}); "
                "give a folder path (no suffix, or ending in /) or drop --format"
            )
        return fmt, path
    if inferred != fmt:
        valid = " or ".join(s for s, f in SUFFIXES.items() if f == fmt)
        if inferred == "hf":
            what = "names a folder (hf)"
        elif inferred:
            what = f"is a {inferred} file"
        else:
            what = f"has the unknown suffix '{path.suffix}'"
        raise CheckpointError(
            f"--format {fmt} does not match --out {raw}, which {what}; {fmt} files end in {valid} (or drop --format)"
        )
    return fmt, path


def require_onnx() -> dict[str, Any]:
    """The ONNX packages (onnx, onnxscript for the exporter, onnxruntime for the check), or a one-line error."""
    missing, modules = [], {}
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            modules[name] = __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise CheckpointError(f"--format onnx needs the package(s) {', '.join(missing)}: {ONNX_INSTALL}")
    return modules


# --- the formats ------------------------------------------------------------------------------------------


def _quiet() -> contextlib.ExitStack:
    """No deprecation warnings and nothing on stdout (``--json`` owns it) while torch exports."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(sys.stderr))
    return stack


def write_torchscript(prepared: PreparedExport, path: Path) -> dict[str, Any]:
    model, size = prepared.model, prepared.meta["preprocessing"]["input_size"]
    with _quiet():
        try:
            module, how = torch.jit.script(model), "script"
        except Exception:  # noqa: BLE001 - not scriptable: trace it (the check below tests other batch sizes)
            module, how = torch.jit.trace(model, check_batch(size, EXPORT_BATCH), check_trace=False), "trace"
        # saved in memory, then written by Python: torch.jit.save straight to a file aborts the process with a C++
        # stack dump on a full disk
        buffer = io.BytesIO()
        torch.jit.save(module, buffer, _extra_files={TORCHSCRIPT_META: json.dumps(prepared.meta)})
        path.write_bytes(buffer.getbuffer())
        loaded = torch.jit.load(str(path), map_location="cpu")
        check = compare(model, loaded, size, "torch.jit.load")
    return {"torchscript": how, **check}


def _onnx_program(model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict[str, Any]) -> str:
    """Export with torch.export (dynamo); if that fails, with the older TorchScript-based exporter."""
    names = dict(input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT], opset_version=ONNX_OPSET)
    try:
        program = torch.onnx.export(
            model, (example,), dynamo=True, verbose=False, dynamic_shapes=({0: torch.export.Dim("batch")},), **names
        )
        program.model.metadata_props["ssl"] = json.dumps(meta)
        program.save(str(path))
        return "dynamo"
    except Exception as dynamo_error:  # noqa: BLE001 - fall back, and report both if that fails too
        for stale in path.parent.iterdir():  # the private staging folder: whatever the failed try left
            stale.unlink()
        try:
            torch.onnx.export(
                model, (example,), str(path), dynamo=False, dynamic_axes={ONNX_INPUT: [0], ONNX_OUTPUT: [0]}, **names
            )
        except Exception as e:  # noqa: BLE001
            first = (str(dynamo_error).strip().splitlines() or [""])[0]
            raise CheckpointError(
                f"torch.onnx.export failed: {type(dynamo_error).__name__}: {first} (and the TorchScript-based "
                f"exporter: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]})"
            ) from None
        import onnx

        proto = onnx.load(str(path))
        entry = proto.metadata_props.add()
        entry.key, entry.value = "ssl", json.dumps(meta)
        onnx.save(proto, str(path))
        return "torchscript"


def write_onnx(prepared: PreparedExport, path: Path) -> dict[str, Any]:
    ort = require_onnx()["onnxruntime"]
    model, size = prepared.model, prepared.meta["preprocessing"]["input_size"]
    with _quiet():
        exporter = _onnx_program(model, check_batch(size, EXPORT_BATCH), path, prepared.meta)
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"onnxruntime cannot load the written ONNX file: {type(e).__name__}: {e}") from None
    inputs, outputs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if inputs != [ONNX_INPUT] or outputs != [ONNX_OUTPUT]:
        raise CheckpointError(
            f"the ONNX graph has inputs {inputs} and outputs {outputs}, not ['images'] / ['features']"
        )
    check = compare(
        model, lambda x: session.run(None, {ONNX_INPUT: x.numpy()})[0], size, f"onnxruntime {ort.__version__}"
    )
    return {"opset": ONNX_OPSET, "exporter": exporter, "input": ONNX_INPUT, "output": ONNX_OUTPUT, **check}


def write_safetensors(prepared: PreparedExport, path: Path) -> dict[str, Any]:
    # through the module attribute, so that the one safetensors writer stays ``export_backbone``
    summary = base.export_backbone(
        prepared.checkpoint, path, projector_layers=prepared.projector_layers, output_view=prepared.output_view
    )
    loaded = load_backbone(path)
    check = compare(prepared.model, loaded, prepared.meta["preprocessing"]["input_size"], "ssl_cli.load_backbone")
    return {**summary, **check}


# --- where the files go -----------------------------------------------------------------------------------


def _is_hf_export(folder: Path) -> bool:
    from safetensors import safe_open

    from ssl_cli.artifacts.checkpoint import EXPORT_FORMAT

    if not ((folder / "config.json").is_file() and (folder / HF_WEIGHTS).is_file()):
        return False
    try:
        with safe_open(str(folder / HF_WEIGHTS), framework="pt") as f:
            return (f.metadata() or {}).get("format") == EXPORT_FORMAT
    except Exception:  # noqa: BLE001 - unreadable: not ours
        return False


def check_out(fmt: str, out: Path, checkpoint: Path) -> None:
    """Refuse outputs that would overwrite the input or something that is not an earlier export."""
    ckpt = checkpoint.expanduser().resolve()
    target = out.resolve()
    if target == ckpt:
        raise CheckpointError(f"--out {out} is the checkpoint itself; choose another file")
    if fmt == "hf":
        if ckpt.is_relative_to(target):
            raise CheckpointError(f"--out {out} contains the checkpoint; choose another folder")
        if out.is_file():
            raise CheckpointError(f"--out {out} is a file; --format hf writes a folder")
        if out.is_dir() and any(out.iterdir()) and not _is_hf_export(out):
            raise CheckpointError(
                f"--out {out} is a folder that is not an earlier hf export (no config.json + ssl model.safetensors); "
                "choose a new or empty folder"
            )
    elif out.is_dir():
        raise CheckpointError(f"--out {out} is a folder; give a file name (or --format hf for a folder)")


def _commit_files(staging: Path, out: Path) -> None:
    """Move the checked files next to ``out``: data files first, ``out`` itself last, each with os.replace."""
    names = sorted((p.name for p in staging.iterdir()), key=lambda n: n == out.name)
    for name in names:
        os.replace(staging / name, out.parent / name)


def _readable(folder: Path) -> None:
    """mkdtemp / mkstemp make private (0700 / 0600) entries; a shared folder gets the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.iterdir():
        p.chmod(0o666 & ~umask)


def _commit_folder(staging: Path, out: Path) -> None:
    """Put the checked folder at ``out``; an earlier export there is moved aside first, deleted only after."""
    _readable(staging)
    if not out.exists():
        os.replace(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old / out.name, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


WRITERS: dict[str, Callable[[PreparedExport, Path], dict[str, Any]]] = {
    "safetensors": write_safetensors,
    "torchscript": write_torchscript,
    "onnx": write_onnx,
}


def export_model(
    checkpoint: str | Path,
    out: str | Path | None = None,
    fmt: str | None = None,
    projector_layers: int = 0,
    output_view: str | None = None,
) -> dict[str, Any]:
    """Write the backbone of ``checkpoint`` in format ``fmt`` (default: from ``out``'s suffix), check it, return
    a summary (``format``, ``path``, ``max_abs_diff``, ``tolerance``, ``verified_with``, ...). ``output_view``
    (CMC's encoders): ``"all"`` or one colour view's name, written into the export's backbone kwargs."""

    fmt, path = resolve_format(fmt, out)
    checkpoint = Path(checkpoint).expanduser()
    check_out(fmt, path, checkpoint)
    if fmt == "onnx":
        require_onnx()  # before the (maybe long) read of the checkpoint
    prepared = prepare_export(checkpoint, projector_layers, output_view)
    if fmt == "safetensors" and projector_layers == 0 and prepared.projector_layers:
        raise CheckpointError(
            f"{checkpoint} is already an export with projector layers; export from the training checkpoint"
        )
    if fmt == "hf":
        hf.refuse_non_stock(prepared)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(path.parent, path.name)  # the staging folders of exports killed outright
    staging = Path(tempfile.mkdtemp(prefix=temporary_prefix(path.name), suffix=".tmp", dir=path.parent))
    try:
        if fmt == "hf":
            details = hf.write_hf(prepared, staging)
            _commit_folder(staging, path)
        else:
            details = WRITERS[fmt](prepared, staging / path.name)
            _commit_files(staging, path)
    except (OSError, CheckpointError) as e:
        if is_disk_full(e):
            raise DiskFull(disk_full_message(path), path) from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    config = prepared.config
    summary = {
        "format": fmt,
        "path": str(path),
        "architecture": config["architecture"],
        "num_features": config["num_features"],
        "small_stem": config["small_stem"],
        "timm_kwargs": config.get("timm_kwargs", {}),
        "input_size": prepared.meta["preprocessing"]["input_size"],
        **({"projector_layers": prepared.projector_layers} if prepared.projector_layers else {}),
        **({"readout": prepared.meta["readout"]} if prepared.meta.get("readout") else {}),
        **details,
    }
    for key in ("backbone", "config", "weights"):  # the staging paths become the final ones
        if key in summary:
            name = Path(summary[key]).name
            summary[key] = str(path / name if fmt == "hf" else path.parent / name)
    return summary
