"""Every safetensors file ssl writes records a hash of its tensors; every read checks it, so weights that changed
after writing (a bad disk, a bad copy, an edit) are refused with one line instead of silently giving worse
features. Files without the hash (older ssl, timm, anyone else) load as before."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from helpers import EVAL, corrupt_tensors, invoke, tiny_checkpoint, user_error
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import write_image_folder
from ssl_cli.artifacts.backbone import load_backbone
from ssl_cli.artifacts.integrity import HASH_KEY
from ssl_cli.artifacts.safetensors_io import atomic_save, read_safetensors
from ssl_cli.errors import CheckpointError


def _recorded_and_recomputed(path: Path) -> tuple[str, str]:
    """The hash in the header, and the documented hash recomputed from the raw file bytes (independently)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    h = hashlib.sha256()
    for name in sorted(k for k in header if k != "__metadata__"):
        begin, end = header[name]["data_offsets"]
        h.update((json.dumps([name, header[name]["dtype"], header[name]["shape"]]) + "\n").encode())
        h.update(data[begin:end])
    return header["__metadata__"][HASH_KEY], h.hexdigest()


def test_the_hash_covers_names_dtypes_shapes_and_bytes_of_what_was_written(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {
        "w": base.t(),  # strided: written as a compact copy, hashed as written
        "w_again": base[1],  # shares storage with ``w``
        "bf16": torch.linspace(-2, 2, 5).bfloat16(),
        "mask": torch.tensor([True, False, True]),
        "steps": torch.tensor(7),  # 0-dim
        "empty": torch.empty(0, 3),
        "ids": torch.arange(4, dtype=torch.int64),
    }
    path = tmp_path / "mixed.safetensors"
    atomic_save(tensors, {"format": "test", HASH_KEY: "0" * 64}, path)  # a stale hash in meta is replaced
    recorded, recomputed = _recorded_and_recomputed(path)
    assert recorded == recomputed
    loaded, meta = read_safetensors(path)
    assert meta == {"format": "test"}  # the hash is checked, not handed on (a re-save records its own)
    assert all(torch.equal(loaded[k], v.contiguous()) for k, v in tensors.items())
    # the same bytes under another name, shape or dtype are another file
    renamed = {("W" if k == "w" else k): v for k, v in tensors.items()}
    reshaped = {**tensors, "ids": tensors["ids"].reshape(2, 2)}
    retyped = {**tensors, "ids": tensors["ids"].view(torch.float64)}
    for other in (renamed, reshaped, retyped):
        atomic_save(other, {"format": "test"}, tmp_path / "other.safetensors")
        assert _recorded_and_recomputed(tmp_path / "other.safetensors")[0] != recorded


def test_weights_changed_after_writing_are_refused_with_one_line(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "export.safetensors")
    load_backbone(ckpt)  # whole, it loads
    corrupt_tensors(ckpt)
    with safe_open(str(ckpt), framework="pt") as f:  # the file is still a valid safetensors file ...
        assert f.metadata()["format"]
    for read in (load_backbone, read_safetensors):  # ... whose weights ssl no longer takes
        with pytest.raises(CheckpointError, match=f"do not match the {HASH_KEY} recorded") as err:
            read(ckpt)
        assert "\n" not in str(err.value) and str(err.value).startswith(str(ckpt))
    data = write_image_folder(tmp_path / "data", per_class=4, classes=2)
    result = invoke("knn", ckpt, "--train", data, "--val", data, *EVAL, "--no-cache")
    user_error(result, str(ckpt), "corrupted or edited after writing", "epoch_NNNN")


def test_a_file_without_the_hash_loads_as_before(tmp_path: Path) -> None:
    """What ssl wrote before it recorded the hash, and what timm or anyone else writes."""
    ckpt = tiny_checkpoint(tmp_path / "export.safetensors")
    with safe_open(str(ckpt), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: v for k, v in f.metadata().items() if k != HASH_KEY}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    corrupt_tensors(tmp_path / "old.safetensors", where=0.0, count=1)  # nothing to check it against: it loads
    old = load_backbone(tmp_path / "old.safetensors").state_dict()
    new = load_backbone(ckpt).state_dict()
    assert sum(not torch.equal(old[k], new[k]) for k in new) == 1
    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    assert torch.equal(read_safetensors(tmp_path / "plain.safetensors")[0]["w"], torch.ones(2))
