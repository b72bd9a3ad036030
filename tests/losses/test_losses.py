"""Losses against independent, written-out computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_cli.losses import KeyQueue, NTXentLoss, moco_contrastive


def ntxent_by_hand(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """SimCLR Eq. (1), one anchor at a time: l(i, j) = -log exp(s_ij/tau) / sum_{k != i} exp(s_ik/tau)."""
    z = torch.cat([z1, z2]).double()
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        pos = i + n if i < n else i - n
        sims = [F.cosine_similarity(z[i], z[k], dim=0).item() / tau for k in range(n2)]
        denom = sum(math.exp(s) for k, s in enumerate(sims) if k != i)
        total += -math.log(math.exp(sims[pos]) / denom)
    return total / n2


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_ntxent_matches_paper_formula(tau: float) -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5) * 3  # scale must not matter: cosine similarity
    assert NTXentLoss(tau)(z1, z2).item() == pytest.approx(ntxent_by_hand(z1, z2, tau), rel=1e-5)


def test_ntxent_closed_form_for_identical_orthogonal_pairs() -> None:
    # N orthonormal directions, both views identical: s(i, pos) = 1, s(i, twin of others) = 0, s(i, i) excluded.
    # Each anchor: -log( e^{1/t} / (e^{1/t} + 2(N-1) e^0) )
    n, tau = 4, 0.5
    z = torch.eye(n)
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * (n - 1)))
    assert NTXentLoss(tau)(z, z.clone()).item() == pytest.approx(expected, rel=1e-6)


def test_ntxent_is_symmetric_in_views_and_lower_for_aligned_views() -> None:
    torch.manual_seed(1)
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    loss = NTXentLoss(0.2)
    assert loss(z1, z2).item() == pytest.approx(loss(z2, z1).item(), rel=1e-6)
    assert loss(z1, z1 + 0.01 * z2).item() < loss(z1, z2).item()


def test_moco_contrastive_matches_written_out_infonce() -> None:
    torch.manual_seed(0)
    q = F.normalize(torch.randn(5, 8), dim=1)
    k = F.normalize(torch.randn(5, 8), dim=1)
    queue = F.normalize(torch.randn(11, 8), dim=1)
    tau = 0.2
    expected = 0.0
    for i in range(5):
        pos = math.exp((q[i] @ k[i]).item() / tau)
        neg = sum(math.exp((q[i] @ queue[j]).item() / tau) for j in range(11))
        expected += -math.log(pos / (pos + neg))
    assert moco_contrastive(q, k, queue, tau).item() == pytest.approx(expected / 5, rel=1e-5)


def test_moco_contrastive_gradient_reaches_queries_only() -> None:
    q = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    k = F.normalize(torch.randn(4, 8), dim=1)
    queue = F.normalize(torch.randn(16, 8), dim=1)
    moco_contrastive(q, k, queue, 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert not k.requires_grad and not queue.requires_grad


def test_queue_is_fifo_with_wraparound() -> None:
    queue = KeyQueue(size=5, dim=2)
    assert queue.keys.shape == (5, 2)
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(5))  # random unit keys before real ones
    batches = [torch.full((2, 2), float(i)) for i in range(1, 5)]  # four batches of two keys
    queue.enqueue(batches[0])
    assert queue.ptr.item() == 2 and torch.equal(queue.keys[:2], batches[0])
    queue.enqueue(batches[1])
    queue.enqueue(batches[2])  # fills slot 4 and wraps to slot 0
    assert queue.ptr.item() == 1
    assert queue.keys[:, 0].tolist() == [3.0, 1.0, 2.0, 2.0, 3.0]
    queue.enqueue(batches[3])  # overwrites the oldest: slots 1, 2
    assert queue.keys[:, 0].tolist() == [3.0, 4.0, 4.0, 2.0, 3.0]
    assert queue.ptr.item() == 3


def test_queue_keeps_newest_when_batch_exceeds_size() -> None:
    queue = KeyQueue(size=3, dim=1)
    queue.enqueue(torch.arange(5.0).view(5, 1))
    assert sorted(queue.keys[:, 0].tolist()) == [2.0, 3.0, 4.0]


def test_queue_state_is_saved_in_state_dict() -> None:
    queue = KeyQueue(size=4, dim=3)
    queue.enqueue(torch.ones(2, 3))
    restored = KeyQueue(size=4, dim=3)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.keys, queue.keys) and restored.ptr.item() == 2
