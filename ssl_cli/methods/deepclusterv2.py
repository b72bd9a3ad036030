"""DeepCluster v2: k-means on a memory of features before every epoch, then learn to predict the clusters.

Backbone -> projector (MLP 2048 -> 128 with BN) -> L2-normalised feature z. A feature memory keeps, for every
training image, the latest z of each of its first ``num_targets`` views (the global crops). Before each epoch,
for each of H heads (default 3 x 3000 clusters), spherical k-means (10 iterations, cosine) clusters the memory of
view ``h % num_targets``; the centroids become the head's prototypes (a bias-free linear layer that no gradient,
weight decay or momentum ever moves) and every image gets one cluster per head. Training then minimises, per
head, the cross-entropy of every view's scores z . c / tau (tau 0.1; local crops included) against the image's
cluster, averaged over the heads; after each optimizer step the step's global-view features replace the
images' memory rows. Before the very first epoch one pass without gradient over the epoch's data fills the
memory (the reference's ``init_memory``).

Across processes (torchrun), every memory write is of all ranks' (index, feature) rows, so every rank holds the
whole memory, and k-means starts from rows drawn with a generator seeded by (train.seed, epoch, head): every rank
computes the same clusters with no collective. The reference instead keeps a per-rank memory of the last epoch's
rows and all-reduces the k-means sums; the result differs only in the random initial centroids, and in the
images a previous epoch dropped with its incomplete last batch: the reference gives them no target (ignored by
the loss), here they keep their older memory row. Images never seen yet have no target.

[0] SwAV / DeepCluster v2, Caron, Misra, Mairal, Goyal, Bojanowski, Joulin 2020, arXiv:2006.09882, Appendix
    (DeepCluster-v2); official code facebookresearch/swav (main_deepclusterv2.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ssl_cli.config.schema import PositiveInt
from ssl_cli.data.loader import mix_seed
from ssl_cli.distributed import gather
from ssl_cli.errors import RecipeError
from ssl_cli.heads import ProjectorConfig, projector
from ssl_cli.losses.deepclusterv2 import NO_CLUSTER, cluster_prediction, spherical_kmeans
from ssl_cli.losses.swav import prototype_scores
from ssl_cli.methods.base import Method, StepOutput
from ssl_cli.methods.multicrop import check_num_targets, encode_by_size
from ssl_cli.methods.registry import register


class DeepClusterV2Config(ProjectorConfig):
    name: Literal["deepclusterv2"] = "deepclusterv2"
    num_prototypes: Annotated[list[PositiveInt], Field(min_length=1)] = [3000, 3000, 3000]
    """One head per entry: a k-means clustering of the memory into that many clusters, and its prototypes."""
    temperature: Annotated[float, Field(gt=0.0)] = 0.1
    kmeans_iterations: PositiveInt = 10
    """E + M steps of each epoch's k-means (a last E step follows them)."""
    num_targets: Annotated[int, Field(ge=1)] = 2
    """The first ``num_targets`` views (the global crops) feed the memory; head h clusters view ``h % num_targets``."""


@register
class DeepClusterV2(Method):
    Config = DeepClusterV2Config
    description = "DeepCluster v2 (2020): k-means of a feature memory every epoch, 3 x 3000 prototypes, multi-crop"
    num_views = 2
    multi_crop = True
    # 2,560 images: a few dozen images per cluster, as 3000 clusters give ImageNet's 1.28M images hundreds
    demo_overrides = {"method.num_prototypes": [100, 100, 100]}

    def __init__(self, config: DeepClusterV2Config, backbone, recipe) -> None:
        super().__init__(config, backbone, recipe)
        check_num_targets(config.num_targets, recipe.num_views, "target views")
        self.projector, self.embed_dim = projector(config, self.feature_dim)
        self.prototypes = nn.ModuleList(nn.Linear(self.embed_dim, k, bias=False) for k in config.num_prototypes)
        # 1 once the first pass has filled the memory; a buffer, so a resumed run does not fill it again
        self.register_buffer("memory_initialized", torch.zeros((), dtype=torch.int64))
        self._allocate(0)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._clustered = False
        self._cluster_usage: float | None = None

    def _allocate(self, num_samples: int) -> None:
        """The per-image state, persistent buffers (checkpoints carry them): features T x N x D, which rows hold a
        feature, and each head's cluster of every image (H x N, ``NO_CLUSTER`` where none)."""
        device = self.memory_initialized.device
        t, h = self.config.num_targets, len(self.config.num_prototypes)
        self.register_buffer("memory", torch.zeros(t, num_samples, self.embed_dim, device=device))
        self.register_buffer("memory_valid", torch.zeros(num_samples, dtype=torch.bool, device=device))
        self.register_buffer("assignments", torch.full((h, num_samples), NO_CLUSTER, dtype=torch.int64, device=device))

    def bind_data(self, num_samples: int, labels: torch.Tensor | None) -> None:
        self._allocate(num_samples)

    def _check_bound(self) -> None:
        if self.memory.shape[1] == 0:
            raise RecipeError("deepclusterv2: the feature memory needs bind_data() with the training set's size")

    @torch.no_grad()
    def _write(self, index: torch.Tensor, features: torch.Tensor) -> None:
        """Memory rows ``index`` (M) <- ``features`` (M x T x D)."""
        self.memory[:, index] = features.transpose(0, 1).to(self.memory.dtype)
        self.memory_valid[index] = True

    def embed(self, views: list[torch.Tensor]) -> torch.Tensor:
        """L2-normalised projections of all ``views`` (V x B images -> VB x D, view-major): the backbone once per
        crop size, the projection head once over all crops, as the reference's forward runs them."""
        return F.normalize(self.projector(torch.cat(encode_by_size(self.backbone, views))).float(), dim=1)

    @torch.no_grad()
    def fill_memory(self, batches: Callable[[], Iterable[tuple[list[torch.Tensor], torch.Tensor]]]) -> None:
        """One pass without gradient (the reference's ``init_memory``): the global views of every batch embedded
        in the module's current mode (training: BatchNorm with batch statistics, as there). The reference runs
        each crop on its own; here they go together, as in the training step (one forward, not T)."""
        t = self.config.num_targets
        for views, index in batches():
            z = self.embed(views[:t])  # TB x D
            self._write(gather(index), gather(z.view(t, -1, z.shape[1]).transpose(0, 1).contiguous()))
        self.memory_initialized.fill_(1)

    @torch.no_grad()
    def cluster(self, epoch: int) -> None:
        """k-means of the remembered rows for every head: prototypes <- centroids, assignments <- clusters."""
        rows = self.memory_valid.nonzero().squeeze(1)
        if rows.numel() == 0:
            raise RecipeError("deepclusterv2: the feature memory is empty; the epoch's data gave no batch")
        self.assignments.fill_(NO_CLUSTER)
        usage = []
        for h, (head, k) in enumerate(zip(self.prototypes, self.config.num_prototypes, strict=True)):
            generator = torch.Generator().manual_seed(mix_seed(self.recipe.train.seed, epoch, h))
            x = self.memory[h % self.config.num_targets, rows]
            centroids, clusters = spherical_kmeans(x, k, self.config.kmeans_iterations, generator)
            head.weight.copy_(centroids.to(head.weight.dtype))
            self.assignments[h, rows] = clusters
            usage.append(torch.bincount(clusters, minlength=k).gt(0).float().mean())
        self._cluster_usage = float(torch.stack(usage).mean())
        self._clustered = True

    def epoch_start(self, epoch: int, batches: Callable[[], Iterable[tuple[list[torch.Tensor], torch.Tensor]]]) -> None:
        self._check_bound()
        if int(self.memory_initialized) == 0:
            self.fill_memory(batches)
        self.cluster(epoch)

    @torch.no_grad()
    def epoch_resume(self, epoch: int) -> None:
        """The epoch's clusters are the checkpoint's (prototypes and ``assignments``): no k-means again."""
        self._check_bound()
        usage = []
        for h, k in enumerate(self.config.num_prototypes):
            clusters = self.assignments[h][self.assignments[h] != NO_CLUSTER]
            usage.append(torch.bincount(clusters, minlength=k).gt(0).float().mean())
        self._cluster_usage = float(torch.stack(usage).mean())
        self._clustered = True

    def training_step(self, views: list[torch.Tensor], step: int, index: torch.Tensor | None = None) -> StepOutput:
        self._check_bound()
        if index is None:
            raise RecipeError("deepclusterv2: the training step needs the batch's dataset indices")
        if not self._clustered:
            raise RuntimeError("deepclusterv2: no clusters yet; epoch_start() runs k-means before an epoch's steps")
        b, t = views[0].shape[0], self.config.num_targets
        z = self.embed(views)  # VB x D
        scores = [prototype_scores(z, head.weight) for head in self.prototypes]  # H x (VB x K_h), fp32
        targets = self.assignments[:, index]  # H x B
        loss = cluster_prediction(scores, targets, self.config.temperature)
        # the loss reads the clusters only, yet the reference writes the memory after the optimizer step; every
        # rank's rows, so the memories of all ranks stay equal
        features = z[: t * b].detach().view(t, b, -1).transpose(0, 1).contiguous()  # B x T x D
        self._pending = (gather(index), gather(features))
        has = targets[0] != NO_CLUSTER
        hits = (scores[0][:b].detach().argmax(dim=1) == targets[0]) & has
        return StepOutput(loss, {"cluster_acc": hits.sum().float() / has.sum().clamp_min(1)})

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        for p in self.prototypes.parameters():
            p.grad = None  # set by k-means only: no gradient step, no weight decay, no momentum

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        if self._pending is not None:
            self._write(*self._pending)
            self._pending = None

    def epoch_end(self, epoch: int) -> dict[str, float]:
        """``cluster_usage``: the share of prototypes that the epoch's k-means gave at least one image (mean over
        heads); a collapse shows as a drop."""
        return {} if self._cluster_usage is None else {"cluster_usage": self._cluster_usage}
