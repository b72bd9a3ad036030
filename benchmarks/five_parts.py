"""Falcon & Cho's five parts, one swapped at a time, on the CIFAR-10 short budget.

Falcon & Cho 2020 ("A Framework For Contrastive Self-Supervised Learning And Designing A New Approach",
arXiv:2009.00104) describe a contrastive method by five choices: (1) augmentation, (2) encoder, (3) representation
extraction, (4) similarity, (5) loss. Their ablations find that the augmentation matters most and that a wider
encoder helps, while CPC's and AMDIM's extraction tricks and the choice of similarity matter little. Each run here
starts from YADIM (their method) and changes one part through its recipe key only:

=============================  =====================================================================
part                           recipe key(s)
=============================  =====================================================================
(1) augmentation               ``[[views]]`` (crop scale, colour jitter, grey, blur, ``randaugment``)
(2) encoder                    ``backbone.name`` (any timm CNN, or AMDIM's ``amdim_32``/``64``/``128``)
(3) representation extraction  ``method.name``: ``yadim`` (last map), ``amdim`` (1->5, 1->7, 5->5),
                               ``cpcv2`` (patch grid + context), ``simclr`` & co. (pooled vector)
(4) similarity                 ``method.similarity`` (``dot`` / ``cosine``), ``method.score_scale``
(5) loss                       ``method.denominator`` (NCE with or without the positives below)
=============================  =====================================================================

The budget is the short table's (``benchmarks/cifar_short.py``: ResNet-18 with the plain timm stem, 32x32, batch
256, 3 epochs with 1 warm-up epoch, the class-balanced 10,000-image subset; kNN k=200 and k=20 on the test split).
Results go to ``OUT/results.jsonl`` in the short table's format, so pointing ``--out`` at that table's folder reuses
its ``yadim`` and ``amdim`` runs (and its random baseline).

    python benchmarks/five_parts.py --train ~/data/train10k --val ~/data/test --out /tmp/bench
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cifar_short import BUDGET, knn, results_store, ssl, top1, top5

# AMDIM's CIFAR views are the base; SimCLR's CIFAR views (simclr-cifar): crop 0.08-1, jitter 0.8 x (0.4, 0.4, 0.4,
# 0.1), grey 0.2; "crop and flip" drops every colour transform
SIMCLR_VIEWS = ["views.*.scale=[0.08, 1.0]", "views.*.ratio=[0.75, 1.3333333333333333]", "views.*.hue=0.1"]
SIMCLR_VIEWS += ["views.*.grayscale_prob=0.2"]
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    # name in results.jsonl: (part, method, --set overrides)
    "yadim": ("base: YADIM (AMDIM's views, ResNet-18, last map, dot / sqrt(D), NCE)", "yadim", []),
    "yadim views=crop+flip": (
        "(1) augmentation: crop and flip only",
        "yadim",
        ["views.*.jitter_prob=0", "views.*.grayscale_prob=0"],
    ),  # fmt: skip
    "yadim views=simclr": ("(1) augmentation: SimCLR's CIFAR views", "yadim", SIMCLR_VIEWS),
    "yadim backbone=resnet34": ("(2) encoder: ResNet-34", "yadim", ["backbone.name=resnet34"]),
    "amdim": ("(3) extraction: AMDIM's multiscale (1->5, 1->7, 5->5)", "amdim", []),
    "yadim similarity=cosine": ("(4) similarity: cosine / 0.1", "yadim", ["method.similarity=cosine"]),
    "yadim denominator=negatives": ("(5) loss: negatives only below", "yadim", ["method.denominator=negatives"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="pretraining images and kNN bank (class folders)")
    parser.add_argument("--val", required=True, help="kNN evaluation images (class folders)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    args.loader = []
    done, save = results_store(args.out)

    for name in args.variants:
        if name in done:
            continue
        _part, method, overrides = VARIANTS[name]
        extra = [x for kv in overrides for x in ("--set", kv)]
        folder = args.out / name.replace(" ", "-").replace("=", "-").replace("+", "-")
        run = ssl("pretrain", "--recipe", f"{method}-cifar", "--data", args.train, *BUDGET, *extra,
                  "--device", args.device, "--out", str(folder))  # fmt: skip
        save({"method": name, "pretrain": run, "knn": knn(args, run["checkpoint"]), "overrides": overrides})
        if "random" not in done:
            save({"method": "random", "knn": knn(args, run["checkpoint"], "--random-init")})

    print("| part swapped | run | kNN top-1 k=200 | kNN top-1 k=20 | top-5 k=200 | final loss | images/s |")
    print("|---|---|---|---|---|---|---|")
    for name in ["random", *args.variants]:
        r = done.get(name)
        if r is None:
            print(f"missing: {name}", file=sys.stderr)
            continue
        part = VARIANTS[name][0] if name in VARIANTS else "random ResNet-18"
        run, k = r.get("pretrain", {}), r["knn"]
        loss = f"{run['loss']:.3f}" if run else "-"
        speed = f"{run['images_per_second']:.0f}" if run else "-"
        print(f"| {part} | `{name}` | {top1(k, 200)} | {top1(k, 20)} | {top5(k, 200)} | {loss} | {speed} |")


if __name__ == "__main__":
    main()
