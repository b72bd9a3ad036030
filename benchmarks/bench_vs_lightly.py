"""``ssl bench`` rows on the default data path, and the same steps with lightly, measured in one sitting.

ResNet-18 with the plain timm stem, batch 256, CIFAR-10 images; SimCLR / MoCo v2 / BYOL at 2 x 32 px, SwAV at
2 x 32 + 6 x 16, DINO at 2 x 32 + 8 x 16 with 4,096 outputs. ``ssl`` runs without any ``data.augment`` flag (what a
user gets); lightly runs ``benchmarks/lightly_peer.py --steps`` (its transforms in 2 DataLoader workers).

    python benchmarks/bench_vs_lightly.py --data ~/data/train10k --out benchmarks/results/bench_vs_lightly_cpu.jsonl \
        --lightly-python ~/lightly-venv/bin/python

One JSON line per row is appended to ``--out`` as it finishes; a Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

COMMON = "--backbone resnet18 --set backbone.small_stem=false --batch-size 256".split()
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
    p.add_argument("--lightly-python", required=True)
    p.add_argument("--methods", nargs="+", default=list(ROWS))
    p.add_argument("--steps", type=int, default=15)
    a = p.parse_args()
    rows = []
    for method in a.methods:
        ours = run([sys.executable, "-m", "ssl_cli", "bench", *ROWS[method], "--data", a.data, *COMMON]
                   + ["--steps", str(a.steps), "--json"])  # fmt: skip
        peer_cmd = [a.lightly_python, str(Path(__file__).with_name("lightly_peer.py")), "--method", method]
        peer_cmd += ["--train", a.data, "--out", f"/tmp/lightly-bench-{method}", "--batch-size", "256"]
        peer = run([*peer_cmd, "--steps", str(a.steps), "--warmup-steps", "3"])
        row = {"method": method, "ssl": ours, "lightly": peer}
        rows.append(row)
        with a.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    print("| method | augmentation | backbone f+b | ceiling | step | step / ceiling | lightly step | ssl / lightly |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, lt = r["ssl"], r["lightly"]["images_per_second"]
        print(
            f"| {r['method']} | `{s['augment']}` | {s['backbone_images_per_second']:.0f} | "
            f"{s['ceiling_images_per_second']:.0f} | {s['step_images_per_second']:.0f} | "
            f"{s['step_vs_ceiling']:.0%} | {lt:.0f} | {s['step_images_per_second'] / lt:.2f}x |"
        )


if __name__ == "__main__":
    main()
