"""Linear probe on frozen features: the standard linear-evaluation protocol.

One ``nn.Linear`` layer is trained on fixed features with SGD + momentum, a per-step cosine learning
rate decay and cross-entropy, then scored on the test features. With ``normalize=True`` the features
are standardised with the train set's statistics first, which is what MAE's probe does with a
``BatchNorm1d(affine=False)`` in front of the head (at evaluation time BatchNorm uses the statistics
gathered on the train set; here they are exact rather than running averages).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_cli.eval.metrics import check_splits, float_dtype, topk_accuracy

__all__ = ["ProbeResult", "fit_linear_heads", "standardization", "topk_accuracy", "train_linear_probe"]

# Same epsilon as the BatchNorm1d(affine=False, eps=1e-6) in MAE's linear probe; it also keeps constant
# feature dimensions at 0 instead of dividing by zero.
_NORM_EPS = 1e-6


@dataclass
class ProbeResult:
    """Outcome of :func:`train_linear_probe`.

    Attributes:
        top1: top-1 accuracy on the test features, in ``[0, 1]``.
        top5: top-5 accuracy on the test features (1.0 with fewer than 5 classes).
        train_top1: top-1 accuracy on the train features after training.
        epochs: number of epochs trained.
        lr: base learning rate as passed in (before the ``batch_size / 256`` scaling).
        weight_decay: weight decay used.
    """

    top1: float
    top5: float
    train_top1: float
    epochs: int
    lr: float
    weight_decay: float


def standardization(train_x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and std (biased variance + 1e-6) of the train features, as ``normalize=True`` uses."""
    mean = train_x.mean(dim=0)
    std = (train_x.var(dim=0, unbiased=False) + _NORM_EPS).sqrt()
    return mean, std


def fit_linear_heads(
    train_x: Tensor,
    train_y: Tensor,
    num_classes: int,
    hyperparameters: Sequence[tuple[float, float]],
    *,
    epochs: int,
    batch_size: int,
    momentum: float,
    generator: torch.Generator,
    progress: Callable[[int, list[float]], None] | None = None,
) -> list[nn.Linear]:
    """Train one linear classifier per ``(lr, weight_decay)`` pair in one pass over the same mini-batches.

    Every head starts from the same weights (truncated normal, std 0.01, drawn once from ``generator``; zero
    bias, as MAE initialises its probe head) and sees the same shuffled batches (drawn from ``generator`` on
    the CPU, so the order does not depend on the device). Each head has its own SGD parameter group (its
    ``lr * batch_size / 256`` and weight decay, shared ``momentum``) and the per-step cosine decay of
    ``CosineAnnealingLR``. The heads' losses are summed for one backward pass; a head's gradient is that of
    its own loss, so each head ends with exactly the weights a run with its pair alone would reach.

    Args:
        train_x: ``(N, D)`` features (already standardised if wanted), on the device to train on.
        train_y: ``(N,)`` integer labels on the same device.
        num_classes: output size of each head.
        hyperparameters: the ``(lr, weight_decay)`` pairs, one head each; ``lr`` is for a batch of 256.
        epochs, batch_size, momentum: as in :func:`train_linear_probe`.
        generator: CPU generator for the initial weights and the batch order.
        progress: called as ``progress(epoch, mean_losses)`` after every epoch, one mean loss per head.

    Returns:
        The trained heads, in the order of ``hyperparameters``.
    """
    device, dtype = train_x.device, train_x.dtype
    # skip_init: nn.Linear's default init would draw from (and advance) the global RNG. Initialise on the CPU
    # instead, where the generator lives.
    heads = [
        nn.utils.skip_init(nn.Linear, train_x.shape[1], num_classes, device="cpu", dtype=dtype) for _ in hyperparameters
    ]
    with torch.no_grad():
        nn.init.trunc_normal_(heads[0].weight, std=0.01, generator=generator)
        for head in heads:
            head.weight.copy_(heads[0].weight)
            nn.init.zeros_(head.bias)
    heads = [head.to(device) for head in heads]

    num_train = train_x.shape[0]
    steps_per_epoch = math.ceil(num_train / batch_size)
    groups = [
        {"params": list(head.parameters()), "lr": lr * batch_size / 256, "weight_decay": weight_decay}
        for head, (lr, weight_decay) in zip(heads, hyperparameters, strict=True)
    ]
    optimizer = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum)
    # Stepped once per mini-batch, so the decay is smooth over the whole run rather than per epoch.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)

    for epoch in range(1, epochs + 1):
        # Drawn on the CPU generator so the order does not depend on the device's RNG.
        order = torch.randperm(num_train, generator=generator).to(device)
        loss_sums = [0.0] * len(heads)
        for batch in order.split(batch_size):
            x, y = train_x[batch], train_y[batch]
            losses = [F.cross_entropy(head(x), y) for head in heads]
            total = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
            for i, value in enumerate(torch.stack(losses).tolist()):
                loss_sums[i] += value * batch.numel()
        if progress is not None:
            progress(epoch, [loss_sum / num_train for loss_sum in loss_sums])
    return heads


def train_linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    *,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    momentum: float = 0.9,
    seed: int = 0,
    normalize: bool = True,
    progress: Callable[[int, float], None] | None = None,
) -> ProbeResult:
    """Train a linear classifier on frozen train features and evaluate it on test features.

    The learning rate follows the linear scaling rule, ``lr * batch_size / 256``, and decays to zero
    with a cosine schedule over all ``epochs * ceil(N_train / batch_size)`` steps. Mini-batches are
    reshuffled every epoch (the last one may be smaller). Weight init and shuffling use a private
    ``torch.Generator`` seeded with ``seed``, so a call is reproducible and leaves the global RNG alone.

    Args:
        train_features: ``(N_train, D)`` frozen features to fit on.
        train_labels: ``(N_train,)`` integer labels in ``[0, num_classes)``.
        test_features: ``(N_test, D)`` frozen features to evaluate on.
        test_labels: ``(N_test,)`` integer labels in ``[0, num_classes)``.
        num_classes: number of classes (output size of the linear layer).
        epochs: passes over the train set, >= 1.
        lr: base learning rate for a batch of 256, > 0.
        weight_decay: L2 penalty passed to SGD, >= 0.
        batch_size: mini-batch size, >= 1.
        momentum: SGD momentum in ``[0, 1)``.
        seed: seed for weight init and batch shuffling.
        normalize: standardise every feature dimension with the train mean/std (also applied, with
            the same train statistics, to the test features).
        progress: called as ``progress(epoch, mean_loss)`` after every epoch, ``epoch`` counting from 1.

    Returns:
        A :class:`ProbeResult` with test top-1/top-5, train top-1 and the hyper-parameters used.

    Raises:
        ValueError: on mismatched shapes, empty splits, labels outside ``[0, num_classes)`` or
            out-of-range hyper-parameters.
    """
    check_splits(train_features, train_labels, test_features, test_labels, num_classes)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")

    device, dtype = train_features.device, float_dtype(train_features, test_features)
    # detach(): the probe must never push gradients back into whatever produced the features.
    train_x = train_features.detach().to(device, dtype)
    test_x = test_features.detach().to(device, dtype)
    train_y = train_labels.to(device=device, dtype=torch.long)
    test_y = test_labels.to(device=device, dtype=torch.long)

    if normalize:
        # Statistics come from the train split only; using test statistics would leak test information.
        mean, std = standardization(train_x)
        train_x = (train_x - mean) / std
        test_x = (test_x - mean) / std

    generator = torch.Generator(device="cpu").manual_seed(seed)
    (head,) = fit_linear_heads(
        train_x,
        train_y,
        num_classes,
        [(lr, weight_decay)],
        epochs=epochs,
        batch_size=batch_size,
        momentum=momentum,
        generator=generator,
        progress=None if progress is None else lambda epoch, losses: progress(epoch, losses[0]),
    )

    with torch.no_grad():
        top1, top5 = topk_accuracy(head(test_x), test_y, (1, 5))
        (train_top1,) = topk_accuracy(head(train_x), train_y, (1,))
    return ProbeResult(top1=top1, top5=top5, train_top1=train_top1, epochs=epochs, lr=lr, weight_decay=weight_decay)
