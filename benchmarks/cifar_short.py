"""CIFAR-10 short identical budget for every method: pretrain, then kNN on the test split.

Reproduces the README table. Every method runs its ``<name>-cifar`` recipe with the same budget
(ResNet-18 with the plain timm stem, 32x32 views, batch 256, 3 epochs, 1 warm-up epoch); a random
encoder of the same architecture is the baseline.

    python benchmarks/cifar_short.py --train ~/data/train10k --val ~/data/test --out /tmp/bench
    python benchmarks/cifar_short.py ... --methods simclr mocov1 --device cuda --num-workers 12

Results go to ``OUT/results.jsonl`` (one record per method, appended as each finishes) and a
Markdown table on stdout. Runs already in ``OUT/results.jsonl`` are skipped, so an interrupted
benchmark picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

METHODS = (
    "simclr mocov2 instdisc invaspread mocov1 simclrv2 byol simsiam barlowtwins swav mocov3 deepclusterv2 dino-resnet "
    "infomin amdim yadim cmc"
).split()
OWN_ENCODER = {"cmc": "cmc_resnet18"}
"""Methods whose encoder is not one network: the same ResNet-18 budget in the method's own form (CMC: one
half-width ResNet-18 per colour view)."""
BUDGET = (
    "--backbone resnet18 --set backbone.small_stem=false --set views.*.size=32 --epochs 3 --batch-size 256 "
    "--set schedule.warmup_epochs=1 --set train.checkpoint_every=0"
).split()


def ssl(*args: str) -> dict:
    cmd = [sys.executable, "-m", "ssl_cli", *args, "--json", "--quiet"]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"command failed with exit {done.returncode}: {' '.join(cmd)}")
    return json.loads(done.stdout)


def knn(args: argparse.Namespace, checkpoint: str, *extra: str) -> dict:
    return ssl(
        "knn",
        checkpoint,
        "--train",
        args.train,
        "--val",
        args.val,
        "--k",
        "200",
        "--k",
        "20",
        "--device",
        args.device,
        *args.loader,
        *extra,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="pretraining images and kNN bank (class folders)")
    parser.add_argument("--val", required=True, help="kNN evaluation images (class folders)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], help="extra recipe override for every run")
    args = parser.parse_args()
    args.loader = [] if args.num_workers is None else ["--num-workers", str(args.num_workers)]
    done, save = results_store(args.out)

    extra = [x for s in args.set for x in ("--set", s)]
    for method in args.methods:
        if method not in done:
            run = ssl(
                "pretrain",
                "--recipe",
                f"{method}-cifar",
                "--data",
                args.train,
                *BUDGET,
                *(["--backbone", OWN_ENCODER[method]] if method in OWN_ENCODER else []),
                *extra,
                "--device",
                args.device,
                *args.loader,
                "--out",
                str(args.out / method),
            )
            save({"method": method, "pretrain": run, "knn": knn(args, run["checkpoint"])})
        baseline = f"random {OWN_ENCODER[method]}" if method in OWN_ENCODER else "random"
        if baseline not in done:  # the same architecture as the run, random weights
            save({"method": baseline, "knn": knn(args, done[method]["pretrain"]["checkpoint"], "--random-init")})

    print("| method (`-cifar` recipe) | kNN top-1 k=200 | kNN top-1 k=20 | top-5 k=200 | final loss | images/s |")
    print("|---|---|---|---|---|---|")
    baselines = ["random"] + [f"random {OWN_ENCODER[m]}" for m in args.methods if m in OWN_ENCODER]
    for method in [*baselines, *args.methods]:
        r = done[method]
        k = r["knn"]
        run = r.get("pretrain", {})
        loss = f"{run['loss']:.3f}" if run else "-"
        speed = f"{run['images_per_second']:.0f}" if run else "-"
        print(f"| {method} | {top1(k, 200)} | {top1(k, 20)} | {top5(k, 200)} | {loss} | {speed} |")


def results_store(out: Path) -> tuple[dict[str, dict], Callable[[dict], None]]:
    """The records of ``out/results.jsonl`` by ``method``, and a function that appends one (and adds it to them)."""
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    done = {}
    if results_file.exists():
        done = {r["method"]: r for r in map(json.loads, results_file.read_text().splitlines())}

    def save(record: dict) -> None:
        done[record["method"]] = record
        with results_file.open("a") as f:
            f.write(json.dumps(record) + "\n")

    return done, save


def top1(k: dict, n: int) -> str:
    return f"{k['by_k'][str(n)]['top1']:.4f}"


def top5(k: dict, n: int) -> str:
    return f"{k['by_k'][str(n)]['top5']:.4f}"


if __name__ == "__main__":
    main()
