"""The method contract: the one small base class every method derives from.

A method composes a backbone (timm, ``num_classes=0``), heads, a loss and optional momentum copies.
The trainer calls ``bind_data(num_samples, labels)`` once (before a resume loads the state), ``epoch_start(epoch,
batches)`` before each epoch, then per step:
``training_step(views, step, index)`` -> backward -> ``before_optimizer_step`` -> optimizer step
-> ``after_optimizer_step(step, total_steps)``
(EMA updates, queue / memory-bank writes), and ``epoch_end(epoch)`` after each epoch (monitors that need
more than one batch). Everything a method needs to resume (queues, memory banks, momentum encoders) is a
parameter or persistent buffer, so it travels in ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ssl_cli.config.schema import MethodConfig, Recipe
from ssl_cli.errors import RecipeError
from ssl_cli.methods.param_groups import param_groups


@dataclass
class StepOutput:
    loss: torch.Tensor
    """The scalar to minimise."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached scalars to log next to the loss (converted to floats only when logged)."""
    monitor_loss: torch.Tensor | None = None
    """The online classifier's loss: minimised together with ``loss`` but not logged as it (it only reaches the
    classifier's own weights)."""


class Method(nn.Module):
    Config: ClassVar[type[MethodConfig]]
    description: ClassVar[str] = ""
    num_views: ClassVar[int] = 2
    """How many views per image the method consumes (the recipe's ``[[views]]`` counts must add up to it)."""
    multi_crop: ClassVar[bool] = False
    """``num_views`` is a minimum: any further views (multi-crop's small crops) are welcome."""
    demo_overrides: ClassVar[dict[str, object]] = {}
    """Recipe keys changed for the built-in demo data (a few thousand 32x32 images), e.g. a smaller queue."""

    def __init__(self, config: MethodConfig, backbone: nn.Module, recipe: Recipe) -> None:
        super().__init__()
        if recipe.num_views != self.num_views and not (self.multi_crop and recipe.num_views > self.num_views):
            needs = f"at least {self.num_views}" if self.multi_crop else f"{self.num_views}"
            raise RecipeError(
                f"views: method '{config.name}' needs {needs} views per image, "
                f"the recipe's [[views]] give {recipe.num_views}"
            )
        self.config = config
        self.recipe = recipe
        self.backbone = backbone
        self.online_classifier: nn.Linear | None = None
        self._online_features: torch.Tensor | None = None

    @property
    def feature_dim(self) -> int:
        return int(self.backbone.num_features)

    def feature_model(self) -> nn.Module:
        """The module whose output is an image's feature, as ``ssl knn`` / ``probe`` / ``export`` read it from this
        run's checkpoints (``ssl_cli.load_backbone``): the backbone itself, unless a method reads its features another
        way (CPC v2: the mean over a patch grid). The online kNN monitor reads it; it shares the backbone's weights."""
        return self.backbone

    def bind_data(self, num_samples: int, labels: torch.Tensor | None) -> None:
        """Called once with the training set's size and labels (None when unlabeled), before any state is loaded.

        Methods with per-image state (InstDisc's memory bank) allocate it here.
        """

    def epoch_start(self, epoch: int, batches: Callable[[], Iterable[tuple[list[torch.Tensor], torch.Tensor]]]) -> None:
        """Called before each epoch (``epoch`` counts from 0, also the first epoch of a resumed run).

        ``batches()`` starts one pass over this rank's share of the epoch's data, yielding ``(views, index)`` on
        the training device: the same views the epoch will train on. Methods that need a look at the data before
        training (DeepCluster v2 filling its feature memory) use it; most ignore it and never call it.
        """

    def epoch_resume(self, epoch: int) -> None:
        """Called instead of ``epoch_start`` when a run resumes in the middle of epoch ``epoch`` (from a mid-epoch
        checkpoint): whatever ``epoch_start`` left in the module's state is back from the checkpoint; restore what
        it left outside (plain attributes)."""

    def training_step(self, views: list[torch.Tensor], step: int, index: torch.Tensor | None = None) -> StepOutput:
        """The loss for one batch. ``index``: the dataset indices of the batch's images (memory banks)."""
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor], step: int, index: torch.Tensor | None = None) -> StepOutput:
        """``training_step``: the trainer calls the module (through DistributedDataParallel when distributed).

        With an online classifier attached, its loss on the step's detached backbone features comes along as
        ``monitor_loss`` (computed here, inside the module DDP wraps, so its gradients are averaged too).
        """
        if self.online_classifier is None or index is None:
            return self.training_step(views, step, index)
        self._online_features = None
        out = self.training_step(views, step, index)
        features, self._online_features = self._online_features, None
        if features is None:
            raise RuntimeError(f"{type(self).__name__}: the online classifier saw no backbone forward in the step")
        return self._online_step(out, features, self.online_labels[index])

    def attach_online_classifier(self, labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> None:
        """A linear classifier on the backbone's features, trained during pretraining from the labels of the batch's
        images (solo-learn's online linear evaluation). It reads the features of the step's first backbone forward
        (the first view, or the first views when same-size views are batched), detached: the backbone's gradients
        and updates are exactly those of the method alone. ``labels``: the training set's, by dataset index.
        """
        # nn.Linear's own init, drawn from ``generator``: the global RNG stays untouched
        classifier = nn.utils.skip_init(nn.Linear, self.feature_dim, num_classes)
        bound = 1.0 / self.feature_dim**0.5
        with torch.no_grad():
            classifier.weight.uniform_(-bound, bound, generator=generator)
            classifier.bias.uniform_(-bound, bound, generator=generator)
        self.online_classifier = classifier
        self.register_buffer("online_labels", labels.to(torch.long), persistent=False)
        self.backbone.register_forward_hook(self._capture_features)

    def _capture_features(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self._online_features is None and self.training:
            self._online_features = output

    def _online_step(self, out: StepOutput, features: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        if features.shape[0] % labels.shape[0]:
            raise RuntimeError(f"online classifier: {features.shape[0]} features for a batch of {labels.shape[0]}")
        targets = labels.repeat(features.shape[0] // labels.shape[0])  # batched views: view-major order
        logits = self.online_classifier(features.detach()).float()
        loss = F.cross_entropy(logits, targets)
        metrics = {
            **out.metrics,
            "online_loss": loss.detach(),
            "online_top1": (logits.argmax(dim=1) == targets).float().mean().detach(),
        }
        return StepOutput(out.loss, metrics, loss)

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after backward, before the optimizer step (e.g. dropping gradients of frozen-for-now layers)."""

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after every optimizer step; momentum updates and queue writes go here."""

    def epoch_end(self, epoch: int) -> dict[str, float]:
        """Called after each epoch (``epoch`` counts from 1); returns monitors for ``metrics.jsonl``."""
        return {}

    def param_groups(self) -> list[dict]:
        """Parameter groups for the optimizer (frozen parameters, e.g. momentum encoders, are left out; so is the
        online classifier, which the trainer gives a group of its own)."""
        optim = self.recipe.optim
        return param_groups(self.method_parameters(), optim.weight_decay, optim.exclude_bias_norm)

    def method_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``named_parameters()`` without the online classifier's."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("online_classifier.")]
