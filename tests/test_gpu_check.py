"""``benchmarks/gpu_check.py --dry-run``: the GPU check's whole plan on the CPU with tiny shapes, so the script (and the
``cuda`` tests it runs) cannot rot between the rare runs on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks/gpu_check.py"


def test_the_dry_run_goes_through_every_step_of_the_plan(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--dry-run", "--long", "--long-budget", "600"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == ["environment", "tests"] + ["bench"] * 6 + ["run", "peer", "compile", "long"]
    by_step = {r["step"]: r for r in rows}
    tests = by_step["tests"]
    assert tests["failed"] == 0 and tests["skipped"] == 0 and tests["passed"] >= 15  # the cuda tests ran, on the CPU
    benches = [r for r in rows if r["step"] == "bench"] + [by_step["compile"]]
    assert [r["row"] for r in benches] == ["simclr", "mocov2", "byol", "swav", "dino", "simclr+channels_last",
                                           "simclr+compile"]  # fmt: skip
    for r in benches:
        assert r["status"] == "ok" and r["step_images_per_second"] > 0 and 0 < r["step_vs_ceiling"]
    assert by_step["run"]["status"] == "ok" and 0 <= by_step["run"]["knn_top1"] <= 1
    assert by_step["long"]["status"] == "ok" and by_step["long"]["epochs"] == 3  # the --long path, 3 epochs here
    assert by_step["peer"]["status"] in ("ok", "skipped")  # lightly: only where it is installed
    table = done.stdout
    assert table.startswith("| step | status | result |") and table.count("\n| bench | ok |") == 6


def test_a_missing_carried_package_stops_the_check_with_one_line(tmp_path: Path) -> None:
    """On the GPU machine lightly (and pydantic, tomli-w) come as carried wheels: without one, one line and exit 2."""
    code = (
        "import importlib.util, runpy, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'tomli_w' else real(name, *a)\n"
        f"sys.argv = ['gpu_check.py', '--out', {str(tmp_path / 'out')!r}, '--dry-run']\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: gpu_check: missing Python package(s) tomli_w: carry their wheels (README, 'The GPU check')"
    ]
    assert not (tmp_path / "out").exists()


def test_without_a_gpu_the_real_check_says_to_dry_run(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--data-tarball", str(tmp_path / "x.tar.gz")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    import torch

    if torch.cuda.is_available():
        return
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == ["error: gpu_check: no CUDA device here; on a machine without one, run --dry-run"]
