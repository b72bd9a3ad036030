"""End-to-end fine-tuning of a pretrained timm backbone with a fresh linear classifier.

The protocol is SimCLR's [0, Appendix B.5] and SimCLR v2's [1, Sec. 3]: the whole network is trained with
cross-entropy on labeled images (random resized crop + horizontal flip), with SGD (momentum 0.9, Nesterov) and a
per-step cosine decay of the learning rate, which is given at batch 256 and scaled linearly by ``batch / 256``. For
ViTs, BEiT [2] and MAE [3] fine-tune with AdamW and layer-wise learning-rate decay.

The model is the timm model itself with its classifier back (``reset_classifier``): its ``state_dict`` is exactly
what ``timm.create_model(name, num_classes=C)`` has, so a stock architecture loads the fine-tuned file with plain
timm. An export with projector layers (``ssl export --projector-layers 1``, SimCLR v2's fine-tuning from the middle
of the projection head) puts those layers in front of the linear layer, in timm's classifier slot.

Layers. "Layer" means one thing here: the layer ids timm's ``param_groups_layer_decay`` assigns from the model's
``group_matcher`` (ResNet: 0 = stem, one id per residual block, the last id = the classifier; ViT: 0 = patch / position
embedding and [CLS] token, one id per block, the last = the head; timm counts the final norm with the last block,
where BEiT counts it with the head).

- ``layer_decay`` d < 1: a parameter of layer ``i`` trains at ``lr * d ** (L - i)``, where ``L`` is the classifier's
  layer id (BEiT / MAE; typical d for a ViT: 0.65-0.75). Biases, norm weights and the parameters the model lists in
  ``no_weight_decay()`` (position embedding, [CLS] token) get no weight decay.
- ``freeze`` K: the parameters of layers ``0 .. K-1`` are not trained, and every module whose parameters are all
  frozen runs in inference mode, so its BatchNorm statistics stay fixed too.

[0] SimCLR, Chen et al. 2020, arXiv:2002.05709.
[1] SimCLR v2, Chen et al. 2020, arXiv:2006.10029.
[2] BEiT, Bao et al. 2021, arXiv:2106.08254, Sec. 2.5 / Appendix (layer-wise learning-rate decay).
[3] Masked Autoencoders Are Scalable Vision Learners (MAE), He et al. 2021, arXiv:2111.06377, Appendix A.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ssl_cli
from ssl_cli.artifacts.atomic import atomic_write_text
from ssl_cli.artifacts.safetensors_io import atomic_save, read_safetensors
from ssl_cli.data import ImageSet
from ssl_cli.errors import CheckpointError, DataError, RecipeError, TrainingError
from ssl_cli.eval.features import extract_features, image_loader
from ssl_cli.runtime import SilentReporter, autocast
from ssl_cli.schedules import cosine_schedule
from ssl_cli.train.optim import REFERENCE_BATCH_SIZE, set_lr

FINETUNED_FORMAT = "ssl-finetuned/1"
OPTIMIZERS = ("sgd", "adamw")
DEFAULT_LR = {"sgd": 0.05, "adamw": 5e-4}
"""At batch 256: SimCLR's fine-tuning rate (0.05 x B/256, Appendix B.5) and MAE's base rate for ViTs."""
DEFAULT_WEIGHT_DECAY = {"sgd": 0.0, "adamw": 0.05}
"""SimCLR fine-tunes without weight decay; MAE fine-tunes ViTs with 0.05."""
CLASSIFIER_INIT_STD = 0.01


@dataclass
class FinetuneConfig:
    """Hyper-parameters of a fine-tuning run (``lr`` at batch 256, scaled by ``batch_size / 256``)."""

    optim: str = "sgd"
    """The optimizer, named like the recipes' ``optim.name`` (``ssl transfer --optim``)."""
    lr: float | None = None
    weight_decay: float | None = None
    epochs: int = 30
    warmup_epochs: float = 0.0
    batch_size: int = 256
    layer_decay: float = 1.0
    freeze: int = 0
    seed: int = 0

    def resolved(self) -> FinetuneConfig:
        """A checked copy with the optimizer's default ``lr`` / ``weight_decay`` filled in."""
        if self.optim not in OPTIMIZERS:
            raise RecipeError(f"--optim {self.optim!r}: unknown; valid: {', '.join(OPTIMIZERS)}")
        lr = DEFAULT_LR[self.optim] if self.lr is None else float(self.lr)
        wd = DEFAULT_WEIGHT_DECAY[self.optim] if self.weight_decay is None else float(self.weight_decay)
        checks = [
            (math.isfinite(lr) and lr > 0, f"--lr {lr}: must be > 0"),
            (math.isfinite(wd) and wd >= 0, f"--weight-decay {wd}: must be >= 0"),
            (self.epochs >= 1, f"--epochs {self.epochs}: must be >= 1"),
            (
                math.isfinite(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs,
                f"--warmup-epochs {self.warmup_epochs}: must be in [0, --epochs]",
            ),
            (self.batch_size >= 2, f"--batch-size {self.batch_size}: must be >= 2 (BatchNorm needs 2 images)"),
            (
                math.isfinite(self.layer_decay) and 0 < self.layer_decay <= 1,
                f"--layer-decay {self.layer_decay}: must be in (0, 1] (1 = off; ViTs: 0.65-0.75)",
            ),
            (self.freeze >= 0, f"--freeze {self.freeze}: must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise RecipeError(message)
        return FinetuneConfig(
            self.optim,
            lr,
            wd,
            int(self.epochs),
            float(self.warmup_epochs),
            int(self.batch_size),
            float(self.layer_decay),
            int(self.freeze),
            int(self.seed),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the model: backbone + classifier ------------------------------------------------------------------------------


def classifier_name(model: nn.Module) -> str:
    """The dotted name of timm's classifier module (``fc``, ``head``, ``head.fc``)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("classifier")
    if not isinstance(name, str) or not name:
        arch = type(model).__name__
        raise CheckpointError(f"{arch}: timm names no single classifier for this model; cannot fine-tune it")
    return name


def attach_classifier(
    backbone: nn.Module,
    num_classes: int,
    projector: nn.Module | None = None,
    projector_width: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """Give a timm backbone (``num_classes=0``) a fresh linear classifier in timm's classifier slot; in place.

    The linear layer starts from a truncated normal (std 0.01) and zero bias, drawn from a generator seeded by
    ``seed``. ``projector`` (layers of a projection head) goes in front of it, inside the slot.
    """
    if num_classes < 1:
        raise CheckpointError(f"fine-tuning needs at least one class, got {num_classes}")
    name = classifier_name(backbone)
    backbone.reset_classifier(num_classes)
    in_features = int(projector_width if projector is not None else backbone.num_features)
    linear = nn.Linear(in_features, num_classes)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        nn.init.trunc_normal_(linear.weight, std=CLASSIFIER_INIT_STD, generator=generator)
        nn.init.zeros_(linear.bias)
    module = linear if projector is None else nn.Sequential(projector, linear)
    parent, _, attr = name.rpartition(".")
    setattr(backbone.get_submodule(parent) if parent else backbone, attr, module)
    if backbone.get_classifier() is not module:
        raise CheckpointError(f"{type(backbone).__name__}: cannot attach a classifier at '{name}'")
    return backbone


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Parameter name -> layer id, exactly as timm's ``param_groups_layer_decay`` computes them."""
    from timm.models import group_parameters
    from timm.optim import auto_group_layers

    if hasattr(model, "group_matcher"):
        return group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    return auto_group_layers(model)


def classifier_layer(model: nn.Module, ids: dict[str, int] | None = None) -> int:
    """The classifier's layer id: the number of layer groups of the backbone in front of it."""
    ids = layer_ids(model) if ids is None else ids
    return max(ids.values())


def freeze_layers(model: nn.Module, k: int, ids: dict[str, int] | None = None) -> list[str]:
    """Stop training the parameters of layers ``0 .. k-1``; returns their names.

    ``k`` may be 0 (nothing frozen) up to the classifier's layer id (the whole backbone in front of the
    classifier's layer group frozen).
    """
    ids = layer_ids(model) if ids is None else ids
    last = classifier_layer(model, ids)
    if not 0 <= k <= last:
        raise CheckpointError(
            f"--freeze {k}: this {type(model).__name__} has {last} layer groups in front of its classifier "
            f"(layer ids 0-{last - 1}, the ids --layer-decay uses); K must be 0-{last}"
        )
    frozen = [name for name, _ in model.named_parameters() if ids.get(name, last) < k]
    names = set(frozen)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in names)
    return frozen


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """Sub-modules whose parameters are all frozen: they run in eval mode (BatchNorm statistics stay fixed)."""
    found = []
    for name, module in model.named_modules():
        params = list(module.parameters())
        if name and params and not any(p.requires_grad for p in params):
            found.append(module)
    return found


def set_train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    model.train()
    for module in frozen:
        module.eval()


def build_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, Nesterov) or AdamW over timm's layer-decay parameter groups.

    Every group carries ``lr_scale = layer_decay ** (L - layer id)``; ``ssl_cli.train.optim.set_lr`` sets each
    group's rate to ``scheduled lr * lr_scale``. Frozen parameters (``requires_grad=False``) are left out.
    """
    from timm.optim import param_groups_layer_decay

    no_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_layer_decay(
        model, weight_decay=cfg.weight_decay, no_weight_decay_list=no_decay, layer_decay=cfg.layer_decay
    )
    peak = peak_lr(cfg)
    if cfg.optim == "sgd":
        return torch.optim.SGD(groups, lr=peak, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)


def peak_lr(cfg: FinetuneConfig) -> float:
    return float(cfg.lr) * cfg.batch_size / REFERENCE_BATCH_SIZE


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Batches per epoch; a last batch of a single image is dropped (BatchNorm cannot train on one image)."""
    full, rest = divmod(num_images, batch_size)
    return full + (1 if rest > 1 else 0)


def lr_schedule(cfg: FinetuneConfig, num_images: int) -> Tensor:
    """Per-step rate: linear warm-up over ``warmup_epochs``, then a cosine to 0 (float64, one value a step)."""
    spe = steps_per_epoch(num_images, cfg.batch_size)
    total = spe * cfg.epochs
    return cosine_schedule(peak_lr(cfg), 0.0, total, round(cfg.warmup_epochs * spe))


# --- training and evaluation ----------------------------------------------------------------------------------------


@torch.no_grad()
def predict(
    model: nn.Module, images: ImageSet, transform, batch_size: int, num_workers, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Logits (float32, CPU) and labels of every image, in eval mode."""
    loader = image_loader(images, transform, batch_size, num_workers)
    return extract_features(model, loader, device)


@dataclass
class FinetuneResult:
    logits: Tensor
    """Validation logits of the final model, N_val x C (CPU)."""
    labels: Tensor
    history: list[dict[str, Any]] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    num_layers: int = 0
    seconds: float = 0.0


def finetune(
    model: nn.Module,
    train: ImageSet,
    val: ImageSet,
    train_transform,
    eval_transform,
    cfg: FinetuneConfig,
    device: torch.device,
    num_workers: int | str = "auto",
    reporter=None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` (backbone with classifier) on ``train``; evaluate on ``val`` after every epoch.

    ``cfg`` must be ``resolved()``. The run is seeded by ``cfg.seed`` (augmentation and shuffling). Every epoch
    ends with a record ``{epoch, step, loss, lr, val_top1, images_per_second, seconds}`` passed to ``reporter``
    and ``on_epoch``. The returned logits are those of the last epoch's evaluation.
    """
    from ssl_cli.eval.metrics import topk_accuracy

    reporter = reporter or SilentReporter()
    torch.manual_seed(cfg.seed)
    model.to(device)
    for p in model.parameters():  # e.g. MoCo v3's frozen patch projection: fine-tuning trains everything
        p.requires_grad_(True)
    ids = layer_ids(model)
    frozen_names = freeze_layers(model, cfg.freeze, ids)
    frozen = frozen_modules(model)
    optimizer = build_optimizer(model, cfg)
    schedule = lr_schedule(cfg, len(train))
    spe = steps_per_epoch(len(train), cfg.batch_size)
    if spe == 0:
        raise DataError(f"fine-tuning needs at least 2 labeled images; the train set has {len(train)}")
    total = spe * cfg.epochs
    reporter.start(total, 0)
    started = time.monotonic()
    step = 0
    history: list[dict[str, Any]] = []
    logits = labels = None
    for epoch in range(cfg.epochs):
        set_train_mode(model, frozen)
        loader = image_loader(train, train_transform, cfg.batch_size, num_workers, shuffle=True, seed=cfg.seed + epoch)
        t0, seen, loss_sum = time.monotonic(), 0, 0.0
        for x, y in loader:
            if len(y) < 2:
                continue  # the epoch's last batch held one image: see steps_per_epoch
            lr = float(schedule[step])
            set_lr(optimizer, lr)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, "auto"):  # bf16 on CUDA, fp32 on the CPU (as ssl pretrain)
                scores = model(x)
            loss = F.cross_entropy(scores.float(), y)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(f"the loss is {value} at epoch {epoch + 1}, step {step + 1}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += len(y)
            loss_sum += value * len(y)
            elapsed = max(time.monotonic() - t0, 1e-9)
            reporter.update(step, epoch, {"loss": value, "lr": lr, "images_per_second": seen / elapsed})
        seconds = time.monotonic() - t0
        logits, labels = predict(model, val, eval_transform, cfg.batch_size, num_workers, device)
        (val_top1,) = topk_accuracy(logits, labels, (1,))
        record = {
            "epoch": epoch + 1,
            "step": step,
            "loss": loss_sum / max(seen, 1),
            "lr": float(schedule[step - 1]),
            "val_top1": val_top1,
            "images_per_second": seen / max(seconds, 1e-9),
            "seconds": seconds,
        }
        history.append(record)
        reporter.epoch_end(record)
        if on_epoch is not None:
            on_epoch(record)
    assert logits is not None and labels is not None
    return FinetuneResult(
        logits,
        labels,
        history,
        frozen_names,
        classifier_layer(model, ids),
        time.monotonic() - started,
    )


# --- saving and loading the fine-tuned model ------------------------------------------------------------------------


def finetuned_meta(
    source_meta: dict[str, Any],
    model: nn.Module,
    classes: list[str],
    projector: dict[str, Any] | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    return {
        "format": FINETUNED_FORMAT,
        "backbone": source_meta["backbone"],
        "preprocessing": source_meta["preprocessing"],
        "classes": list(classes),
        "num_classes": len(classes),
        "classifier": classifier_name(model),
        **({"projector": projector} if projector else {}),
        "ssl_version": ssl_cli.__version__,
        **extra,
    }


def save_finetuned(model: nn.Module, meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """Write the model (timm keys, classifier included) atomically, and ``<path>.json`` (how to load it)."""
    atomic_save(model.state_dict(), meta, path)
    b = meta["backbone"]
    pre = meta["preprocessing"]
    stock = not b.get("small_stem") and b.get("norm", "batchnorm") == "batchnorm" and not meta.get("projector")
    kwargs = b.get("kwargs", {})
    load = (
        f"timm.create_model({b['name']!r}, num_classes={meta['num_classes']}"
        + "".join(f", {k}={v!r}" for k, v in kwargs.items())
        + f").load_state_dict(safetensors.torch.load_file({path.name!r}))"
        if stock
        else f"ssl_cli.transfer.finetune.load_finetuned({path.name!r})"
    )
    config = {
        "architecture": b["name"],
        "timm_kwargs": kwargs,
        "num_classes": meta["num_classes"],
        "classes": meta["classes"],
        "classifier": meta["classifier"],
        "small_stem": bool(b.get("small_stem", False)),
        "norm": b.get("norm", "batchnorm"),
        "projector_layers": (meta.get("projector") or {}).get("num_layers", 0),
        "mean": pre["mean"],
        "std": pre["std"],
        "input_size": pre["input_size"],
        "load": load,
        "ssl_version": ssl_cli.__version__,
    }
    config_path = path.with_suffix(".json")
    atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")
    return config


def load_finetuned(path: str | Path, device: str = "cpu", with_meta: bool = False):
    """Rebuild a model written by ``ssl transfer`` (backbone + classifier), in eval mode; it returns logits.

    ``meta["classes"]`` names the outputs; ``meta["preprocessing"]`` holds the mean / std / input size.
    """
    from ssl_cli.artifacts.backbone import backbone_config, build_from_meta, head_from_spec
    from ssl_cli.artifacts.metadata import Finetuned, check_metadata
    from ssl_cli.artifacts.state import load_state

    path = Path(path).expanduser()
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FINETUNED_FORMAT:
        found = meta.get("format", "missing")
        raise CheckpointError(f"{path} is not a model written by ssl transfer (format: {found})")
    check_metadata(meta, path, required=("backbone", "num_classes"), schema=Finetuned)
    torch.manual_seed(0)
    backbone = build_from_meta(meta, path, freeze_patch_embed=False)
    projector = meta.get("projector")
    head = head_from_spec(projector["layers"]) if projector else None
    model = attach_classifier(backbone, int(meta["num_classes"]), head, (projector or {}).get("num_features"))
    name = backbone_config(meta, path).name
    load_state(model, tensors, f"{path}: the weights do not fit {name} with {meta['num_classes']} classes")
    model = model.to(device).eval()
    return (model, meta) if with_meta else model
