"""DINO's self-distillation loss, its centering and its teacher-temperature schedule.

The teacher's output for each global view is centred (a running mean of teacher outputs is subtracted) and
sharpened (softmax at a low temperature); every student view other than that same view learns to predict it
with a cross-entropy at the student temperature. Centering keeps one dimension from dominating, sharpening
keeps the output from going uniform; together they avoid collapse without negatives or a predictor.

[0] DINO, Caron, Touvron, Misra, Jegou, Mairal, Bojanowski, Joulin 2021, arXiv:2104.14294, Sec. 3.1, Eq. (3)-(4)
    and Algorithm 1; official code facebookresearch/dino (main_dino.py, DINOLoss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_cli.distributed import all_reduce_mean
from ssl_cli.precision import fp32


@fp32  # softmaxes at T 0.1 (student) and 0.04 (teacher): in fp32 under bf16 autocast (ssl_cli.precision)
def dino_loss(
    student: list[torch.Tensor], teacher_probs: list[torch.Tensor], student_temperature: float
) -> torch.Tensor:
    """Mean over (teacher view t, student view s != t) of ``-sum_k P_t[k] log softmax(student_s / T_s)[k]``.

    Args:
        student: one B x K tensor of head outputs (logits) per student view; the first ``len(teacher_probs)``
            are the global views the teacher also saw, in the same order.
        teacher_probs: one B x K tensor per global view: the teacher's centred, sharpened softmax (no gradient).
        student_temperature: T_s (0.1).

    A student view is never asked to predict the teacher's output for the same crop: those pairs are skipped.
    The result is averaged over samples and over the ``len(teacher_probs) * (len(student) - 1)`` pairs.
    """
    log_p = [F.log_softmax(s.float() / student_temperature, dim=-1) for s in student]
    total, pairs = student[0].new_zeros((), dtype=torch.float32), 0
    for t, target in enumerate(teacher_probs):
        for s, logp in enumerate(log_p):
            if s == t:
                continue
            total = total + torch.sum(-target * logp, dim=-1).mean()
            pairs += 1
    if pairs == 0:
        raise ValueError("dino_loss: needs at least one student view other than the teacher's views")
    return total / pairs


@torch.no_grad()
@fp32
def teacher_probs(teacher: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's targets: ``softmax((teacher - center) / temperature)`` (centring, then sharpening)."""
    return F.softmax((teacher.float() - center) / temperature, dim=-1)


@torch.no_grad()
@fp32
def updated_center(center: torch.Tensor, teacher: torch.Tensor, momentum: float) -> torch.Tensor:
    """``m * center + (1 - m) * mean(teacher outputs)``, the batch mean over every process's global views.

    ``teacher``: the raw (uncentred) teacher outputs of this process, all global views stacked (n x K). Every
    rank holds the same number of rows, so the mean of the ranks' means is the global batch mean.
    """
    batch_center = all_reduce_mean(teacher.float().mean(dim=0, keepdim=True))
    return center * momentum + batch_center * (1.0 - momentum)


def teacher_temperatures(
    warmup_temperature: float, temperature: float, warmup_epochs: int, epochs: int
) -> torch.Tensor:
    """One teacher temperature per epoch: a linear ramp over ``warmup_epochs`` epochs from ``warmup_temperature``
    (epoch 0) to ``temperature`` (epoch ``warmup_epochs - 1``), then ``temperature`` (DINO: 0.04 -> 0.07, 30).

    A warm-up longer than the run is cut off, not squeezed: the ramp keeps its slope.
    """
    if warmup_epochs < 0 or epochs < 0:
        raise ValueError(f"warmup_epochs and epochs must be >= 0, got {warmup_epochs}, {epochs}")
    ramp = torch.linspace(warmup_temperature, temperature, warmup_epochs, dtype=torch.float64)
    rest = torch.full((max(epochs - warmup_epochs, 0),), float(temperature), dtype=torch.float64)
    return torch.cat([ramp, rest])[:epochs]
