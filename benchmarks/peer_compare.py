"""Equal-budget comparison with the most used peer library (lightly): SimCLR and MoCo v2, quality and speed.

Both sides train timm's ResNet-18 with the plain stem on 32x32 images, batch 256, for the same number of epochs
(2 by default) on the same folder, and both are scored by the same weighted kNN (``ssl knn``, k=200, T=0.07) on
the test split. ``ssl`` runs its ``-cifar`` recipes as a user would (default data path, the warm-up cut to 10% of
the run as ``ssl pretrain``'s warning advises); lightly runs ``benchmarks/lightly_peer.py`` in its own venv.

    python benchmarks/peer_compare.py --train ~/data/train --val ~/data/test --out /tmp/peer \
        --lightly-python ~/lightly-venv/bin/python

Results go to ``OUT/results.jsonl`` (one record per run, kept across restarts: finished runs are skipped) and a
Markdown table on stdout: kNN top-1 (k=200), wall time of the training run and its images/s. ``--seed`` seeds both
libraries' runs (another seed: another run); ``--ssl-set KEY=VALUE`` adds a ``--set`` to ours (e.g. lightly's
learning rate, ``optim.lr=0.12``), recorded as the run's ``variant``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from cifar_short import ssl
from safetensors.torch import load_file

from ssl_cli.artifacts.safetensors_io import atomic_save, read_safetensors
from ssl_cli.config.schema import IMAGENET_MEAN, IMAGENET_STD
from ssl_cli.export.backbone import export_backbone

BUDGET = "--backbone resnet18 --set backbone.small_stem=false --set views.*.size=32 --set train.checkpoint_every=0"


def _name(a: argparse.Namespace, library: str, method: str) -> str:
    """The run's folder name: ``ssl-mocov2``, ``ssl-mocov2-seed1-optim.lr=0.12``, ``lightly-mocov2-seed1``."""
    parts = [library, method] + ([f"seed{a.seed}"] if a.seed else []) + (a.ssl_set if library == "ssl" else [])
    return "-".join(parts)


def ours(a: argparse.Namespace, method: str) -> dict:
    warmup = f"schedule.warmup_epochs={0.1 * a.epochs:g}"
    extra = [x for kv in a.ssl_set for x in ("--set", kv)]
    out = a.out / _name(a, "ssl", method)
    start = time.perf_counter()
    if (out / "checkpoints").is_dir():  # an interrupted run (e.g. stopped with SIGTERM): continue it exactly
        run = ssl("pretrain", "--out", str(out), "--resume")
        return {**run, "wall_s": time.perf_counter() - start, "resumed": True}
    run = ssl(
        "pretrain", "--recipe", f"{method}-cifar", "--data", a.train, *BUDGET.split(), "--set", warmup, *extra,
        "--epochs", str(a.epochs), "--batch-size", str(a.batch_size), "--seed", str(a.seed),
        "--out", str(out),
    )  # fmt: skip
    return {**run, "wall_s": time.perf_counter() - start}


def peer(a: argparse.Namespace, method: str, reference_checkpoint: str) -> dict:
    """lightly's run in its venv, then its backbone saved as an ``ssl`` export (so ``ssl knn`` scores it alike)."""
    out = a.out / _name(a, "lightly", method)
    cmd = [a.lightly_python, str(Path(__file__).with_name("lightly_peer.py")), "--method", method, "--train", a.train]
    cmd += ["--out", str(out), "--epochs", str(a.epochs), "--batch-size", str(a.batch_size), "--seed", str(a.seed)]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    result = {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - start}
    # the export metadata of our own run of the same architecture, with lightly's preprocessing (ImageNet statistics)
    export = out / "reference-export.safetensors"
    export_backbone(reference_checkpoint, export)
    _, meta = read_safetensors(export)
    meta["preprocessing"] = {**meta["preprocessing"], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    meta["method"] = f"lightly-{method}"
    tensors = load_file(str(out / "backbone.safetensors"))
    result["checkpoint"] = str(out / "lightly-backbone.safetensors")
    atomic_save(tensors, meta, Path(result["checkpoint"]))
    return result


def knn(a: argparse.Namespace, checkpoint: str) -> float:
    r = ssl("knn", checkpoint, "--train", a.train, "--val", a.val, "--k", "200")
    return r["by_k"]["200"]["top1"] if "by_k" in r else r["top1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--lightly-python", required=True, help="python of a venv with lightly, timm and safetensors")
    p.add_argument("--methods", nargs="+", default=["simclr", "mocov2"])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="seeds both libraries' runs")
    p.add_argument("--ssl-set", action="append", default=[], help="KEY=VALUE: a --set for our runs (repeatable)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    results = a.out / "results.jsonl"
    done = {r["run"]: r for r in map(json.loads, results.read_text().splitlines())} if results.exists() else {}

    def save(record: dict) -> None:
        done[record["run"]] = record
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")

    for method in a.methods:
        mine, theirs = _name(a, "ssl", method), _name(a, "lightly", method)
        common = {"method": method, "seed": a.seed}
        if mine not in done:
            run = ours(a, method)
            variant = {"variant": " ".join(a.ssl_set)} if a.ssl_set else {}
            save({"run": mine, "library": "ssl", **common, **variant, **run, "knn_top1": knn(a, run["checkpoint"])})
        if theirs not in done:
            run = peer(a, method, done[mine]["checkpoint"])
            save({"run": theirs, "library": "lightly", **common, **run, "knn_top1": knn(a, run["checkpoint"])})

    print("| method | library | seed | variant | kNN top-1 (k=200) | wall time | images/s (training steps) |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(done.values(), key=lambda r: (r["method"], r["library"] != "ssl", r.get("seed", 0))):
        print(
            f"| {r['method']} | {r['library']} | {r.get('seed', 0)} | {r.get('variant', '')} | {r['knn_top1']:.4f} "
            f"| {r['wall_s']:.0f} s | {r['images_per_second']:.0f} |"
        )


if __name__ == "__main__":
    main()
