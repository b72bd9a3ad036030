"""Multi-process training: a step on 2 gloo ranks x B samples equals a step on one process with the 2B samples.

Each method's cross-sample parts must be global (negatives gathered with their gradient, queues and banks fed
with every rank's keys, Barlow Twins' correlation and BatchNorm statistics over the global batch), and DDP's
gradient average must turn into the global batch's gradient. The models use BatchNorm synchronised over the
ranks (``ssl_cli.train.sync_batchnorm``), so the two runs compute the same function.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dist_worker import CASES, run_case, worker

pytestmark = pytest.mark.ddp


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    out = root / "results.pt"
    mp.spawn(worker, args=(2, str(root / "init"), str(out)), nprocs=2, join=True)
    return torch.load(out)


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_equal_one_process_with_the_global_batch(case: str, two_rank_results: dict) -> None:
    torch.set_num_threads(2)
    single = run_case(case)
    dist = two_rank_results[case]
    assert dist["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)
    assert single["state"].keys() == dist["state"].keys()
    changed = 0
    for key, value in single["state"].items():
        other = dist["state"][key]
        if value.is_floating_point():
            torch.testing.assert_close(other, value, rtol=1e-4, atol=2e-5, msg=lambda m, k=key: f"{k}: {m}")
        else:
            assert torch.equal(other, value), key
        changed += 1
    assert changed > 0


def test_the_two_ranks_really_split_the_batch(tmp_path: Path) -> None:
    """Guard against a vacuous comparison: one step on half of the batch gives different weights."""
    import dist_worker

    full = run_case("simclr")
    dist_worker.GLOBAL_BATCH //= 2
    try:
        half = run_case("simclr")
    finally:
        dist_worker.GLOBAL_BATCH *= 2
    assert full["losses"][0] != pytest.approx(half["losses"][0], rel=1e-3)
