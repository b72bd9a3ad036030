"""``ssl bench`` rows on the default data path, and the same steps with lightly, measured in one sitting.

ResNet-18 with the plain timm stem, batch 256, CIFAR-10 images; SimCLR / MoCo v2 / BYOL at 2 x 32 px, SwAV at
2 x 32 + 6 x 16, DINO at 2 x 32 + 8 x 16 with 4,096 outputs. ``ssl`` runs without any ``data.augment`` flag (what a
user gets); lightly runs ``benchmarks/lightly_peer.py --steps`` (its transforms in 2 DataLoader workers).

    python benchmarks/bench_vs_lightly.py --data ~/data/train10k --out benchmarks/results/bench_vs_lightly_cpu.jsonl \
        --lightly-python ~/lightly-venv/bin/python

With ``--small-stem`` the rows run on the CIFAR stem instead (3x3 stride-1 first convolution, no max-pool: the
backbone of every ``-cifar`` recipe, and of lightly's own CIFAR-10 benchmark); lightly runs on the same stem when
``--lightly-python`` is given, and is left out otherwise:

    python benchmarks/bench_vs_lightly.py --data ~/data/train10k --out FILE --small-stem --batch-size 128 --steps 6 \
        --warmup-steps 2 --lightly-python ~/lightly-venv/bin/python

One JSON line per row is appended to ``--out`` as it finishes; a Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

COMMON = ["--backbone", "resnet18"]
ROWS = {
    "simclr": ["--recipe", "simclr-cifar", "--set", "views.*.size=32"],
    "mocov2": ["--recipe", "mocov2-cifar", "--set", "views.*.size=32"],
    "byol": ["--recipe", "byol-cifar", "--set", "views.*.size=32"],
    "swav": ["--recipe", "swav", "--set", "views.0.size=32", "--set", "views.1.size=16"],
    "dino": ["--recipe", "dino-resnet", "--set", "views.0.size=32", "--set", "views.1.size=32"]
    + ["--set", "views.2.size=16", "--set", "method.num_prototypes=4096"],
}


def run(cmd: list[str]) -> dict:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--lightly-python", help="python of a venv with lightly; required without --small-stem")
    p.add_argument("--small-stem", action="store_true", help="the CIFAR stem (lightly's too, if it runs)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=list(ROWS))
    p.add_argument("--steps", type=int, default=15)
    a = p.parse_args()
    if not a.small_stem and not a.lightly_python:
        p.error("--lightly-python is required without --small-stem")
    common = [*COMMON, "--set", f"backbone.small_stem={str(a.small_stem).lower()}", "--batch-size", str(a.batch_size)]
    rows = []
    for method in a.methods:
        ours = run([sys.executable, "-m", "ssl_cli", "bench", *ROWS[method], "--data", a.data, *common]
                   + ["--steps", str(a.steps), "--warmup-steps", str(a.warmup_steps), "--json"])  # fmt: skip
        row = {"method": method, "small_stem": a.small_stem, "ssl": ours}
        if a.lightly_python:
            peer_cmd = [a.lightly_python, str(Path(__file__).with_name("lightly_peer.py")), "--method", method]
            peer_cmd += ["--train", a.data, "--out", f"/tmp/lightly-bench-{method}", "--batch-size", str(a.batch_size)]
            peer_cmd += ["--small-stem"] * a.small_stem
            row["lightly"] = run([*peer_cmd, "--steps", str(a.steps), "--warmup-steps", str(a.warmup_steps)])
        rows.append(row)
        with a.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print("| method | backbone f+b | ceiling | step | step / ceiling | step FLOPs / ceiling's | compute bound "
          "| step / bound | lightly step | ssl / lightly |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["ssl"]
        lt = r["lightly"]["images_per_second"] if "lightly" in r else None
        peer = f"{lt:.0f} | {s['step_images_per_second'] / lt:.2f}x" if lt else "- | -"
        print(
            f"| {r['method']} | {s['backbone_images_per_second']:.0f} | {s['ceiling_images_per_second']:.0f} | "
            f"{s['step_images_per_second']:.0f} | {s['step_vs_ceiling']:.0%} | {s['step_flops_vs_ceiling']:.2f} | "
            f"{s['compute_bound_images_per_second']:.0f} | {s['step_vs_compute_bound']:.0%} | {peer} |"
        )


if __name__ == "__main__":
    main()
