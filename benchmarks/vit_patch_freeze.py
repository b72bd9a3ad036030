"""MoCo v3's ViT stabiliser: the same run with the random patch projection frozen and trained, same budget.

Pretrains ``mocov3-vit-cifar`` (ViT-Tiny, 4x4 patches, 32x32) twice, ``backbone.freeze_patch_embed`` true and
false, records the running loss every 10 steps (the epoch's mean so far, as the progress bar shows it), then runs
kNN on the validation images. Results go to ``OUT/results.jsonl`` and a Markdown table on stdout.

    python benchmarks/vit_patch_freeze.py --train ~/data/train10k --val ~/data/test --out /tmp/vit_freeze --epochs 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ssl_cli.config import load_recipe
from ssl_cli.eval.run import run_knn, setup
from ssl_cli.runtime import SilentReporter
from ssl_cli.train.pretrain import pretrain


class CurveReporter(SilentReporter):
    def __init__(self) -> None:
        self.curve: list[tuple[int, float]] = []

    def update(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        self.curve.append((step, round(metrics["loss"], 4)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--recipe", default="mocov3-vit-cifar")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--set", action="append", default=[], help="extra recipe override for both runs")
    parser.add_argument("--runs", nargs="+", choices=["frozen", "trained"], default=["frozen", "trained"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for frozen in (run == "frozen" for run in args.runs):
        overrides = [
            ("backbone.freeze_patch_embed", frozen),
            ("train.epochs", args.epochs),
            ("train.batch_size", args.batch_size),
            ("train.checkpoint_every", 0),
            ("schedule.warmup_epochs", min(1, args.epochs)),
            ("data.augment", "batch"),
            *args.set,
        ]
        reporter = CurveReporter()
        out = args.out / f"frozen_{frozen}"
        result = pretrain(load_recipe(args.recipe, overrides), args.train, out, reporter=reporter)
        knn = run_knn(setup(result.checkpoint, args.train, args.val, "auto"), [200, 20], 0.07, 256, 0)
        row = {
            "recipe": args.recipe,
            "freeze_patch_embed": frozen,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "loss": result.loss,
            "knn": {k: round(v["top1"], 4) for k, v in knn["by_k"].items()},
            "images_per_second": result.images_per_second,
            "curve": reporter.curve,
        }
        rows.append(row)
        with (args.out / "results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
    print("| patch projection | final loss | kNN top-1 (k=200 / 20) | images/s | loss every 10 steps |")
    print("|---|---|---|---|---|")
    for r in rows:
        curve = ", ".join(f"{loss:.2f}" for _, loss in r["curve"])
        state = "frozen" if r["freeze_patch_embed"] else "trained"
        knn = f"{r['knn']['200']} / {r['knn']['20']}"
        print(f"| {state} | {r['loss']:.3f} | {knn} | {r['images_per_second']:.0f} | {curve} |")


if __name__ == "__main__":
    main()
