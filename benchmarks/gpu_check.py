"""The GPU check: every GPU path of ``ssl`` tested and measured in one prepared run (about 5 minutes on one H100).

    python benchmarks/gpu_check.py --out DIR --data-tarball .gpu/cifar10-jpeg.tar.gz          # on the GPU machine
    python benchmarks/gpu_check.py --out DIR --data-tarball .gpu/cifar10-jpeg.tar.gz --long   # + lightly's budget
    python benchmarks/gpu_check.py --out DIR --dry-run                                   # the same plan on the CPU

The steps, in order; each result is one JSON line in ``DIR/results.jsonl`` as soon as it is known, a step that fails
is recorded with its error and the others still run, and a summary table goes to stdout at the end (exit code 1 if a
step failed):

1. ``environment``: torch, CUDA, the GPU and its driver;
2. ``tests``: ``pytest -m cuda`` (bf16 autocast per method family, whole-batch augmentation on the GPU against the
   CPU's, fused / multi-tensor optimizers, kNN and the probe on the GPU, export of a GPU run, its resume on the CPU);
3. ``bench``: ``ssl bench`` rows for SimCLR, MoCo v2, BYOL, SwAV multi-crop and DINO (ResNet-18, CIFAR stem, 32 px,
   batch 512, a 10,000-image subset), and SimCLR with ``train.channels_last``;
4. ``run``: ``simclr-cifar`` for 2 epochs on the full CIFAR-10 (whole-batch augmentation on the GPU), then kNN
   (k = 200) on the test split: wall time, images/s, top-1;
5. ``peer``: lightly's SimCLR step on the same GPU, backbone, batch and image size, its own transforms in DataLoader
   workers (``benchmarks/lightly_peer.py``): images/s beside ours;
6. ``compile``: the SimCLR bench row with ``train.compile`` (last: compiling takes a minute or two);
7. with ``--long``: ``simclr-cifar`` at lightly's published budget (200 epochs, batch 512, kNN k = 200), when the
   rate measured in step 4 says it ends within ``--long-budget`` seconds (else one line saying why not).

The packages the GPU machine lacks (pydantic and its core, tomli-w, lightly and its dependencies) are carried as
wheels (README, "The GPU check"); they are checked first, and a missing one stops the check with one line.

``--dry-run`` runs the same plan on the CPU in about a minute: a tiny tarball of generated images, timm's test
ResNet, batches of 16, the ``cuda`` tests on the CPU (``SSL_CUDA_TESTS_DEVICE=cpu``), torch.compile's eager backend,
and lightly only if it is installed. ``tests/test_gpu_check.py`` runs it, so the script cannot rot between GPU runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEEDED = ["torch", "torchvision", "timm", "typer", "rich", "safetensors", "pydantic", "tomli_w", "pytest"]
BENCH_ROWS = {
    "simclr": ("simclr-cifar", []),
    "mocov2": ("mocov2-cifar", []),
    "byol": ("byol-cifar", []),
    "swav": ("swav-cifar", []),
    "dino": ("dino-resnet-cifar", []),
    "simclr+channels_last": ("simclr-cifar", [("train.channels_last", True)]),
}


@dataclass
class Plan:
    """The sizes of one check: the real one on the GPU or the dry run's on the CPU."""

    device: str
    backbone: str
    small_stem: bool
    batch_size: int
    bench_steps: int
    bench_warmup: int
    run_epochs: int
    knn_k: int
    peer_steps: int
    bench_images: int
    pytest_timeout: int
    env: dict[str, str] = field(default_factory=dict)


REAL = Plan("cuda", "resnet18", True, 512, 20, 5, 2, 200, 40, 10_000, 300)
DRY = Plan("cpu", "test_resnet", False, 16, 1, 1, 2, 20, 2, 48, 240, {"SSL_CUDA_TESTS_DEVICE": "cpu"})


class Check:
    """Runs the steps, appending each result to ``out/results.jsonl``."""

    def __init__(self, out: Path, plan: Plan) -> None:
        self.out, self.plan, self.rows = out, plan, []
        out.mkdir(parents=True, exist_ok=True)
        self.results = out / "results.jsonl"

    def record(self, step: str, **result) -> dict:
        row = {"step": step, **result}
        with self.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        print(f"[gpu_check] {step}: {summary(row)}", file=sys.stderr, flush=True)
        return row

    def step(self, name: str, run: Callable[[], dict | list[dict]]) -> None:
        started = time.perf_counter()
        try:
            results = run()
        except Exception as e:  # a failed step is a result: the next steps still run
            tail = traceback.format_exc().splitlines()[-6:]
            self.record(name, status="error", error=f"{type(e).__name__}: {e}", traceback=tail)
            return
        for result in results if isinstance(results, list) else [results]:
            self.record(name, status=result.pop("status", "ok"), seconds=time.perf_counter() - started, **result)


def summary(row: dict) -> str:
    """One line for the table: the figures that matter of each kind of result."""
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('error') or row.get('reason', '')}"
    keys = [
        "gpu", "torch", "cuda", "driver", "passed", "failed", "skipped", "row", "step_images_per_second",
        "ceiling_images_per_second", "step_vs_ceiling", "step_vs_compute_bound", "images_per_second", "knn_top1",
        "wall_s",
    ]  # fmt: skip
    shown = [f"{k}={row[k]:.3g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys if k in row]
    return " ".join(shown)


def missing_packages(needed: list[str]) -> list[str]:
    return [name for name in needed if importlib.util.find_spec(name) is None]


def environment() -> dict:
    import torch

    result = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        result.update(gpu=props.name, memory_gib=props.total_memory / 2**30, capability=[props.major, props.minor])
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        result["driver"] = smi.stdout.strip() or None
    else:
        result.update(gpu=None, driver=None)
    return result


def gpu_tests(plan: Plan, out: Path) -> dict:
    """``pytest -m cuda`` in a subprocess: its counts, and the names of the failures."""
    report = out / "pytest-cuda.xml"
    # only the files that hold cuda tests are collected (importing the whole suite's modules costs more than they run)
    tests = (REPO / "tests").rglob("test_*.py")
    files = sorted(str(p.relative_to(REPO)) for p in tests if "mark.cuda" in p.read_text())
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *files]
    env = {**os.environ, **plan.env, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=plan.pytest_timeout)
    counts = junit_counts(report)
    status = "ok" if done.returncode == 0 and counts["passed"] > 0 else "failed"
    return {"status": status, **counts, "exit_code": done.returncode, "tail": done.stdout.splitlines()[-15:]}


def junit_counts(report: Path) -> dict:
    import xml.etree.ElementTree as ET

    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    failures = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped, "failures": failures}


def unpack(tarball: Path, into: Path) -> tuple[Path, Path]:
    """The CIFAR-10 tarball (``train/`` and ``test/`` ImageFolders) unpacked into ``into``."""
    with tarfile.open(tarball) as tar:
        tar.extractall(into, filter="data")
    train, test = into / "train", into / "test"
    if not (train.is_dir() and test.is_dir()):
        raise SystemExit(f"error: {tarball} holds no train/ and test/ folders (the CIFAR-10 JPEG tarball does)")
    return train, test


def subset(train: Path, into: Path, images: int) -> Path:
    """A class-balanced ImageFolder of ``images`` links into ``train`` (``ssl bench`` rows decode only these)."""
    classes = sorted(d for d in train.iterdir() if d.is_dir())
    per_class = images // len(classes)
    for c in classes:
        (into / c.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(c.iterdir())[:per_class]:
            (into / c.name / f.name).symlink_to(f)
    return into


def placed(plan: Plan) -> list[tuple[str, object]]:
    """The recipe keys of the plan's backbone and device."""
    return [("backbone.name", plan.backbone), ("backbone.small_stem", plan.small_stem), ("train.device", plan.device)]


def bench_row(plan: Plan, data: Path, name: str) -> dict:
    from ssl_cli.config import load_recipe
    from ssl_cli.train.bench import bench

    recipe_name, extra = BENCH_ROWS.get(name, ("simclr-cifar", [("train.compile", True)]))
    sets = [*placed(plan), ("train.batch_size", plan.batch_size)]
    sets += [("views.*.size", 32)] if name not in ("swav", "dino") else []
    recipe = load_recipe(recipe_name, [*sets, *extra])
    result = bench(recipe, str(data), steps=plan.bench_steps, warmup_steps=plan.bench_warmup)
    result.pop("encoder_calls", None)
    return {"row": name, **result}


def real_run(plan: Plan, train: Path, test: Path, out: Path) -> dict:
    """simclr-cifar for ``plan.run_epochs`` epochs on ``train`` (its default data path), then kNN on ``test``."""
    from ssl_cli.eval.run import run_knn, setup
    from ssl_cli.train.launch import run_pretraining

    sets = [*placed(plan), ("train.batch_size", plan.batch_size)]
    sets += [("train.epochs", plan.run_epochs), ("train.checkpoint_every", 0), ("views.*.size", 32)]
    sets += [("schedule.warmup_epochs", 0.1 * plan.run_epochs)]  # ssl pretrain's advice for short runs
    started = time.perf_counter()
    result = run_pretraining("simclr-cifar", str(train), out, overrides=sets)
    trained = time.perf_counter() - started
    started = time.perf_counter()
    s = setup(result.checkpoint, str(train), str(test), plan.device)
    knn = run_knn(s, [plan.knn_k], 0.07, 1024 if plan.device == "cuda" else 64, 4 if plan.device == "cuda" else 0)
    return {
        "recipe": "simclr-cifar",
        "epochs": plan.run_epochs,
        "batch_size": plan.batch_size,
        "wall_s": trained,
        "images_per_second": result.images_per_second,
        "loss": result.loss,
        "knn_k": plan.knn_k,
        "knn_top1": knn["top1"],
        "knn_s": time.perf_counter() - started,
    }


def peer(plan: Plan, train: Path, out: Path) -> dict:
    """lightly's SimCLR step (``benchmarks/lightly_peer.py --steps``) on the same device, backbone, batch and size."""
    if importlib.util.find_spec("lightly") is None:
        return {"status": "skipped", "reason": "lightly is not installed (needed on the GPU machine only)"}
    workers = 0 if plan.device == "cpu" else min(16, os.cpu_count() or 1)
    cmd = [sys.executable, str(REPO / "benchmarks/lightly_peer.py"), "--method", "simclr", "--train", str(train)]
    cmd += ["--out", str(out), "--steps", str(plan.peer_steps), "--warmup-steps", "5" if plan.device == "cuda" else "1"]
    cmd += ["--batch-size", str(plan.batch_size), "--workers", str(workers), "--device", plan.device]
    cmd += ["--small-stem"] if plan.small_stem else []
    if plan.backbone != "resnet18":
        cmd += ["--backbone", plan.backbone]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"status": "error", "error": done.stderr.strip().splitlines()[-1:]}
    return {"library": "lightly", **json.loads(done.stdout.strip().splitlines()[-1])}


def long_run(plan: Plan, train: Path, test: Path, out: Path, rate: float | None, budget: float) -> dict:
    """simclr-cifar at lightly's published budget (200 epochs, batch 512, kNN k=200), if ``rate`` (images/s of the
    2-epoch run) says it ends within ``budget`` seconds."""
    epochs = 200 if plan.device == "cuda" else 3
    images = sum(1 for c in train.iterdir() if c.is_dir() for _ in c.iterdir())
    if not rate:
        return {"status": "skipped", "reason": "no measured rate: the 2-epoch run did not finish"}
    estimate = epochs * images / rate
    if estimate > budget:
        return {
            "status": "skipped",
            "reason": f"{epochs} epochs at {rate:,.0f} images/s take ~{estimate:,.0f} s: over --long-budget {budget:g}",
        }
    long_plan = Plan(**{**plan.__dict__, "run_epochs": epochs})
    return {"estimate_s": estimate, **real_run(long_plan, train, test, out)}


def dry_tarball(into: Path) -> Path:
    """A tarball shaped like the CIFAR-10 one (``train/`` and ``test/`` ImageFolders) of generated 32x32 images."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import write_image_folder

    write_image_folder(into / "images/train", per_class=16, classes=4, ext="jpg")
    write_image_folder(into / "images/test", per_class=8, classes=4, split="test", ext="jpg")
    tarball = into / "tiny-cifar.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(into / "images" / split, arcname=split)
    return tarball


def run_plan(check: Check, tarball: Path, work: Path, long: bool, long_budget: float) -> None:
    plan = check.plan
    check.step("environment", environment)
    check.step("tests", lambda: gpu_tests(plan, check.out))
    train, test = unpack(tarball, work / "data")
    bench_data = subset(train, work / "bench-subset", plan.bench_images)
    for name in BENCH_ROWS:
        check.step("bench", lambda name=name: bench_row(plan, bench_data, name))
    check.step("run", lambda: real_run(plan, train, test, work / "simclr-cifar"))
    check.step("peer", lambda: peer(plan, train, work / "lightly"))
    check.step("compile", lambda: bench_row(plan, bench_data, "simclr+compile"))
    if long:
        rate = next((r.get("images_per_second") for r in check.rows if r["step"] == "run" and r["status"] == "ok"), 0)
        check.step("long", lambda: long_run(plan, train, test, work / "simclr-cifar-long", rate, long_budget))


def table(rows: list[dict]) -> str:
    lines = ["| step | status | result |", "|---|---|---|"]
    lines += [f"| {r['step']} | {r['status']} | {summary(r) if r['status'] == 'ok' else ''} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="folder for results.jsonl (and the GPU tests' report)")
    p.add_argument("--data-tarball", type=Path, help="cifar10-jpeg.tar.gz (../shared/data); not with --dry-run")
    p.add_argument("--dry-run", action="store_true", help="the same plan on the CPU with tiny shapes (about a minute)")
    p.add_argument("--long", action="store_true", help="also simclr-cifar for 200 epochs, if it fits --long-budget")
    p.add_argument("--long-budget", type=float, default=480.0, help="seconds the --long run may take (default 480)")
    a = p.parse_args()
    plan = DRY if a.dry_run else REAL
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        print("error: gpu_check: no CUDA device here; on a machine without one, run --dry-run", file=sys.stderr)
        return 2
    missing = missing_packages(NEEDED + ([] if a.dry_run else ["lightly"]))
    if missing:
        print(f"error: gpu_check: missing Python package(s) {', '.join(missing)}: carry their wheels (README, "
              "'The GPU check')", file=sys.stderr)  # fmt: skip
        return 2
    if not a.dry_run and (a.data_tarball is None or not a.data_tarball.is_file()):
        print(f"error: gpu_check: --data-tarball {a.data_tarball}: not a file (cifar10-jpeg.tar.gz)", file=sys.stderr)
        return 2
    check = Check(a.out, plan)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        if a.dry_run:
            import ssl_cli.train.placement as placement

            placement.COMPILE_BACKEND = "eager"  # the wiring, not the compiler's minutes on 2 CPU cores
            # one thread: tiny ops on a busy small machine slow down many times over with spinning thread pools
            torch.set_num_threads(1)
        tarball = dry_tarball(work) if a.dry_run else a.data_tarball
        run_plan(check, tarball, work, a.long, a.long_budget)
    print(table(check.rows))
    return 1 if any(r["status"] not in ("ok", "skipped") for r in check.rows) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
