"""InstDisc: unsupervised feature learning via non-parametric instance discrimination ("memory bank").

Every image is its own class. One augmented view per image -> backbone -> linear 128-d embedding ->
L2-normalised feature f. A memory bank keeps one feature v_i per training image; the loss is NCE with m noise
samples drawn uniformly from the bank and P(i|f) = exp(v_i . f / tau) / Z, Z estimated from the first batch
and then fixed. ``loss = "softmax"`` is the paper's exact non-parametric softmax instead (Eq. 2, over all n bank
entries; the official code's ``LinearAverage``, ``--nce-k 0``), what the paper reports on CIFAR-10 (Table 1) and
what the small-image recipe uses: at our short budgets NCE with m = 4096 does not learn on CIFAR-10 (README).
After each optimizer step the batch's bank rows move towards the new features:
v_i <- normalise(momentum v_i + (1 - momentum) f_i) (the proximal term of Sec. 3.4, momentum 0.5).

With labels, each epoch reports ``bank_knn_top1``: the paper's weighted kNN (k = 200, sigma = 0.07) of random
bank entries against the remaining entries, a free monitor (no forward pass).

[0] InstDisc, Wu, Xiong, Yu, Lin 2018, arXiv:1805.01978; official code zhirongw/lemniscate.pytorch.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ssl_cli.config.schema import PositiveInt, Probability
from ssl_cli.distributed import gather
from ssl_cli.errors import RecipeError
from ssl_cli.eval.knn import knn_classify
from ssl_cli.heads import ProjectorConfig, ProjectorKind, projector
from ssl_cli.losses.instdisc import MemoryBank, estimate_z, nce_loss
from ssl_cli.methods.base import Method, StepOutput
from ssl_cli.methods.registry import register
from ssl_cli.precision import full_precision

KNN_K, KNN_TEMPERATURE = 200, 0.07  # the paper's weighted kNN (Sec. 3.5)


class InstDiscConfig(ProjectorConfig):
    name: Literal["instdisc"] = "instdisc"
    projector: ProjectorKind = "linear"  # backbone -> fc 128 -> L2 norm, no MLP
    temperature: Annotated[float, Field(gt=0.0)] = 0.07
    loss: Literal["nce", "softmax"] = "nce"
    """``nce``: NCE with ``nce_k`` noise samples and a fixed Z (ImageNet); ``softmax``: the exact non-parametric
    softmax over the whole bank (CIFAR-10 in the paper's Table 1)."""
    nce_k: PositiveInt = 4096
    """m, the noise samples per image drawn uniformly from the bank."""
    bank_momentum: Probability = 0.5
    """Proximal / momentum term of the bank update (0: replace the entry by the new feature)."""
    monitor_samples: Annotated[int, Field(ge=0)] = 2048
    """Bank entries classified by the kNN monitor each epoch against the other entries (0: no monitor)."""


@register
class InstDisc(Method):
    Config = InstDiscConfig
    description = "InstDisc (2018): memory bank of 128-d features, NCE with 4096 noise samples, tau 0.07"
    num_views = 1
    # 2,560 images: fewer noise samples than images; tau 0.07 with a fixed Z collapses the features within a few
    # dozen steps on tiny data (all f alike, the noise terms explode), tau 0.2 does not
    demo_overrides = {"method.nce_k": 1024, "method.temperature": 0.2}

    def __init__(self, config: InstDiscConfig, backbone, recipe) -> None:
        super().__init__(config, backbone, recipe)
        self.projector, self.embed_dim = projector(config, self.feature_dim)
        # Z, estimated from the first batch (0: not yet); a buffer, so a resumed run keeps the same constant
        self.register_buffer("nce_z", torch.zeros((), dtype=torch.float64))
        self.bank: MemoryBank | None = None
        self.labels: torch.Tensor | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._z_known = False  # avoids a host sync per step once Z is set (or loaded from a checkpoint)

    def bind_data(self, num_samples: int, labels: torch.Tensor | None) -> None:
        device = self.nce_z.device
        self.bank = MemoryBank(num_samples, self.embed_dim, device=device)
        self.labels = None if labels is None else labels.to(device=device, dtype=torch.long)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)).float(), dim=1)  # N x D

    def log_p(self, f: torch.Tensor, index: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """log P(j|f) = v_j . f / tau - log Z for each row's own entry (column 0) and its noise entries: B x (1 + m).

        Sets Z on first use (the reference: Z = n * mean of exp(v . f / tau) over that batch's B x (1 + m) pairs).
        """
        idx = torch.cat([index[:, None], noise], dim=1)  # B x (1 + m)
        logits = self.bank.logits(idx, f, self.config.temperature)  # fp32 under bf16 autocast
        if not self._z_known and self.nce_z.item() == 0.0:
            self.nce_z.copy_(estimate_z(logits, self.bank.size))  # the mean over every rank's first batch
        self._z_known = True
        return logits - self.nce_z.log().float()

    def training_step(self, views: list[torch.Tensor], step: int, index: torch.Tensor | None = None) -> StepOutput:
        if self.bank is None or index is None:
            raise RecipeError("instdisc: the memory bank needs bind_data() and the batch's dataset indices")
        (x,) = views
        f = self.embed(x)
        # the bank is read by the loss graph: write the global batch's features only after the optimizer step
        self._pending = (gather(index), gather(f.detach()))
        if self.config.loss == "softmax":
            with full_precision(f):
                logits = f.float() @ self.bank.features.T / self.config.temperature  # B x n
            acc = (logits.argmax(dim=1) == index).float().mean().detach()  # own entry ranked first of all n
            return StepOutput(F.cross_entropy(logits, index), {"instance_acc": acc})
        noise = self.bank.sample_noise(f.shape[0], self.config.nce_k)
        log_p = self.log_p(f, index, noise)
        acc = (log_p[:, :1] > log_p[:, 1:]).all(dim=1).float().mean().detach()  # own entry beats all noise
        return StepOutput(nce_loss(log_p, self.bank.size), {"instance_acc": acc})

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        if self._pending is not None:
            self.bank.update(*self._pending, self.config.bank_momentum)
            self._pending = None

    @torch.no_grad()
    def bank_knn_top1(self, epoch: int) -> float:
        """Weighted kNN of up to ``monitor_samples`` random bank entries against all the other entries."""
        n = self.bank.size
        # its own generator: the monitor leaves the training RNG streams untouched
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).to(self.labels.device)
        split = min(self.config.monitor_samples, n // 2)
        queries, refs = perm[:split], perm[split:]
        bank, labels = self.bank.features, self.labels
        result = knn_classify(
            bank[refs], labels[refs], bank[queries], labels[queries], int(labels.max()) + 1, (KNN_K,), KNN_TEMPERATURE
        )
        return result[KNN_K][0]

    def epoch_end(self, epoch: int) -> dict[str, float]:
        if self.labels is None or self.bank is None or self.config.monitor_samples == 0 or self.bank.size < 2:
            return {}
        return {"bank_knn_top1": self.bank_knn_top1(epoch)}
