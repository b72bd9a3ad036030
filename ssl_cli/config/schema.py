"""The recipe schema: every key a recipe may hold, its type, default and valid range.

A recipe is validated once, at the edge (``ssl_cli.config.load``), and is immutable afterwards. Each
section is a frozen pydantic model that rejects unknown keys and wrong types, so a typo is one clear
error rather than a silently ignored setting. Method sections are declared by the methods themselves
(``MethodConfig`` subclasses in ``ssl_cli/methods``).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationInfo, field_validator, model_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Pair = Annotated[list[float], Field(min_length=2, max_length=2)]
Triple = Annotated[list[float], Field(min_length=3, max_length=3)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(ge=1)]


# backbone.kwargs: words of timm.create_model arguments that load weights or name a file / place, and the ones ssl
# sets itself
LOADING_WORDS = frozenset(
    {"pretrained", "checkpoint", "path", "file", "url", "dir", "hub", "cache", "download", "weights"}
)
DROP_PATH = frozenset({"drop_path_rate", "drop_path"})  # stochastic depth: "path" as in a network's residual path
MANAGED_KWARGS = frozenset({"num_classes", "features_only", "scriptable", "exportable", "no_jit"})
SAFE_NAME = re.compile(r"[A-Za-z0-9_.,-]{1,100}")


class Section(BaseModel):
    """Base of every recipe section: strict types, no unknown keys, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class RecipeInfo(Section):
    name: str = ""
    description: str = ""


class MethodConfig(Section):
    """Base of every method's settings; each method declares its own subclass with ``name: Literal[...]``."""

    name: str


class BackboneConfig(Section):
    name: str = "resnet18"
    """Any timm model name; created with ``num_classes=0`` so it returns pooled features."""
    small_stem: bool = False
    """ResNets on 32x32 images: 3x3 stride-1 first convolution and no max-pool (SimCLR's CIFAR stem)."""
    img_size: PositiveInt | None = None
    """ViT input size (timm ``img_size``)."""
    patch_size: PositiveInt | None = None
    """ViT patch size (timm ``patch_size``)."""
    freeze_patch_embed: bool = False
    """Keep the random patch projection of a ViT frozen (MoCo v3)."""
    dynamic_img_size: bool = False
    """ViTs: accept inputs of any size, the position embedding interpolated to the patch grid (timm
    ``dynamic_img_size``), so multi-crop's small crops go through the same ViT (DINO)."""
    pos_embed: Literal["learn", "sincos"] = "learn"
    """ViTs: ``sincos`` replaces the learned position embedding by a fixed (frozen) 2-D sin-cos embedding, MoCo v3's;
    ``learn``: timm's learned one."""
    weight_init: Literal["timm", "mocov3"] = "timm"
    """ViTs: ``mocov3`` initialises as the MoCo v3 code does: xavier-uniform linear layers (Q, K, V as three
    matrices; timm's ``weight_init="moco"``) and the patch projection uniform with the fan-in/out of a
    ``3 p^2 -> dim`` linear layer. ``timm``: timm's default init."""
    drop_path_rate: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    norm: Literal["batchnorm", "groupnorm_ws"] = "batchnorm"
    """``groupnorm_ws``: every BatchNorm2d becomes GroupNorm (32 groups) and every Conv2d a weight-standardised
    convolution, so the encoder uses no batch statistics (BYOL without BN, Richemond et al. 2020)."""
    kwargs: dict[str, int | float | bool | str] = {}
    """Further keyword arguments for ``timm.create_model``: architecture only (``num_heads = 12``, ``depth = 4``,
    ``global_pool = "avg"``). Keys that load weights or name a file, a folder, a URL or a hub (``pretrained``,
    ``checkpoint_path``, ``pretrained_cfg_overlay``, ``cache_dir``, ...) are refused, and a string value must be a
    plain name (letters, digits, ``_ . , -``), so neither a recipe nor a stranger's checkpoint can make timm read
    a path or reach the network."""

    @field_validator("kwargs")
    @classmethod
    def _architecture_only(cls, v: dict[str, int | float | bool | str]) -> dict[str, int | float | bool | str]:
        for key, value in v.items():
            words = set(key.lower().split("_")) - ({"path"} if key in DROP_PATH else set())
            if not key.isidentifier() or words & LOADING_WORDS or key in MANAGED_KWARGS:
                raise ValueError(
                    f"{key!r} is not an architecture argument ssl passes to timm (no weights, files, URLs or hubs; "
                    f"{', '.join(sorted(MANAGED_KWARGS))} are set by ssl)"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{key} = {value} must be finite")
            if isinstance(value, str) and not SAFE_NAME.fullmatch(value):
                raise ValueError(
                    f"{key} = {value!r} must be a plain name (letters, digits, _ . , -), not a path or URL"
                )
        return v


class ViewConfig(Section):
    """One kind of augmented view (SimCLR / BYOL style); ``count`` views of it per image."""

    count: PositiveInt = 1
    size: PositiveInt = 224
    scale: Pair = [0.08, 1.0]
    ratio: Pair = [3.0 / 4.0, 4.0 / 3.0]
    hflip_prob: Probability = 0.5
    jitter_prob: Probability = 0.8
    jitter_strength: Annotated[float, Field(ge=0.0)] = 1.0
    """Colour jitter strength s: brightness = contrast = saturation = 0.8 s, hue = 0.2 s (SimCLR)."""
    brightness: Annotated[float, Field(ge=0.0)] | None = None
    """Brightness jitter; set to override 0.8 s (BYOL: 0.4). Likewise ``contrast``, ``saturation``, ``hue``."""
    contrast: Annotated[float, Field(ge=0.0)] | None = None
    saturation: Annotated[float, Field(ge=0.0)] | None = None
    hue: Annotated[float, Field(ge=0.0, le=0.5)] | None = None
    grayscale_prob: Probability = 0.2
    blur_prob: Probability = 0.5
    blur_sigma: Pair = [0.1, 2.0]
    solarize_prob: Probability = 0.0
    randaugment: Literal["none", "infomin"] = "none"
    """``infomin``: InfoMin's RandAugment after the blur, and the grey after it (the order of InfoMin's code, PyContrast
    aug ``D``): ``randaugment_n`` ops per image, drawn with replacement from 15 (autocontrast, equalize, invert,
    rotate, posterize, solarize, solarize-add, colour, contrast, brightness, sharpness, shear x / y, translate x /
    y), each applied with ``randaugment_prob``, at a level drawn per op from N(``randaugment_m``,
    ``randaugment_mstd``) clipped to [0, 10] (PyContrast's ``rand-n2-m10-mstd0.5``; ``ssl_cli.augment.randaugment``).
    ``none``: no RandAugment."""
    randaugment_n: Annotated[int, Field(ge=1, le=16)] = 2
    """RandAugment: ops drawn per image (RandAugment's N)."""
    randaugment_m: Annotated[float, Field(ge=0.0, le=10.0)] = 10.0
    """RandAugment: the magnitude level out of 10 (RandAugment's M; 10: rotations of 30 degrees, shears of 0.3,
    translations of 0.45 of the side, enhancement factors of 1.9)."""
    randaugment_mstd: Annotated[float, Field(ge=0.0, le=10.0)] = 0.5
    """RandAugment: the standard deviation of the Gaussian noise on the level, drawn per op (timm's ``mstd``)."""
    randaugment_prob: Probability = 0.5
    """RandAugment: each drawn op is applied with this probability (0.5 in PyContrast and timm)."""

    @field_validator("randaugment_n", "randaugment_m", "randaugment_mstd", "randaugment_prob")
    @classmethod
    def _randaugment_on(cls, v: float, info: ValidationInfo) -> float:
        if info.data.get("randaugment") == "none" and v != cls.model_fields[str(info.field_name)].default:
            raise ValueError("does nothing while randaugment = 'none'; set randaugment = 'infomin' to turn it on")
        return v

    def jitter(self) -> dict[str, float]:
        """The colour-jitter strengths: per-channel fields where set, else derived from ``jitter_strength``."""
        s = self.jitter_strength
        derived = {"brightness": 0.8 * s, "contrast": 0.8 * s, "saturation": 0.8 * s, "hue": min(0.5, 0.2 * s)}
        return {k: v if getattr(self, k) is None else float(getattr(self, k)) for k, v in derived.items()}

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: list[float]) -> list[float]:
        if not (0.0 < v[0] <= v[1] <= 1.0):
            raise ValueError("must be [low, high] with 0 < low <= high <= 1")
        return v

    @field_validator("ratio", "blur_sigma")
    @classmethod
    def _ordered(cls, v: list[float]) -> list[float]:
        if not (0.0 < v[0] <= v[1]):
            raise ValueError("must be [low, high] with 0 < low <= high")
        return v


class DataConfig(Section):
    mean: Triple = list(IMAGENET_MEAN)
    std: Triple = list(IMAGENET_STD)
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    cache: Literal["auto", "memory", "none"] = "auto"
    """``memory``: decode every image once and keep it; ``auto``: do so when the set fits (< 4 GiB)."""
    augment: Literal["auto", "batch", "crop", "sample"] = "auto"
    """``batch``: whole batches as tensors on the training device (needs the images in memory at one size; no
    workers); ``crop``: decode, random resized crop and flip per image in loader workers (uint8 at the view's size),
    the rest of the chain on the device in whole batches; ``sample``: the whole chain per image in loader workers
    (torchvision); ``auto``: ``batch`` whenever the images allow it, else ``crop`` (the run's first lines say which,
    and why). A checkpoint saved before ``auto`` existed has no such key and was trained with ``sample``:
    ``--resume`` keeps it (``ssl_cli.train.pretrain``)."""


class OptimConfig(Section):
    name: Literal["sgd", "lars", "adamw", "adam"] = "sgd"
    """``adamw``: Adam with decoupled weight decay; ``adam``: Adam with the decay added to the gradient (L2, as
    ``torch.optim.Adam``: AMDIM's and YADIM's official optimizer)."""
    lr: Annotated[float, Field(gt=0.0)] = 0.05
    """Base learning rate; the effective rate is lr * batch_size / 256 with ``lr_scaling = "linear"``."""
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    weight_decay: Annotated[float, Field(ge=0.0)] = 1e-4
    betas: Pair = [0.9, 0.999]
    exclude_bias_norm: bool = True
    """No weight decay (and no LARS adaptation) for biases and normalisation parameters."""
    trust_coefficient: Annotated[float, Field(gt=0.0)] = 0.001
    """LARS trust coefficient (eta)."""
    clip_lr: bool = False
    """LARS only: LARC's clip mode, each layer's rate min(trust_coefficient * ||w|| / ||g||, lr) instead of their
    product (solo-learn's CIFAR recipes)."""
    weight_decay_end: Annotated[float, Field(ge=0.0)] | None = None
    """Weight decay at the end of the run, reached on a cosine from ``weight_decay`` (DINO: 0.04 -> 0.4); unset:
    constant. Scales every decayed group alike."""
    clip_grad: Annotated[float, Field(ge=0.0)] = 0.0
    """Clip each parameter's gradient to this L2 norm before the step (DINO's per-parameter clipping, 3.0);
    0: no clipping."""

    @model_validator(mode="after")
    def _weight_decay_end(self) -> OptimConfig:
        if self.weight_decay_end is not None and self.weight_decay <= 0.0:
            raise ValueError("weight_decay_end needs a positive weight_decay to start its schedule from")
        return self


class ScheduleConfig(Section):
    name: Literal["cosine", "constant", "step"] = "cosine"
    warmup_epochs: Annotated[float, Field(ge=0.0)] = 0.0
    min_lr: Annotated[float, Field(ge=0.0)] = 0.0
    """Learning rate at the end of the cosine decay (absolute)."""
    milestones: list[Annotated[float, Field(gt=0.0)]] = []
    """``step``: epochs at which the rate is multiplied by ``gamma`` (MoCo v1 / InstDisc: [120, 160])."""
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    """``step``: the factor applied at each milestone."""
    factors: list[Annotated[float, Field(gt=0.0)]] | None = None
    """``step``: the rate relative to the base from each milestone on, one per milestone (InvaSpread: x0.1, x0.05,
    x0.01 at 120, 160, 200); unset: ``gamma ** i`` after the i-th milestone."""
    warmup_start: Annotated[float, Field(ge=0.0)] = 0.0
    """The learning rate at the first warm-up step (absolute, like ``min_lr``); the warm-up ramps linearly from it to
    the peak (SwAV / DeepCluster v2's 800-epoch scripts: ``--start_warmup 0.3``)."""

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(b <= a for a, b in zip(v[:-1], v[1:], strict=True)):
            raise ValueError("must be strictly increasing epochs")
        return v

    @model_validator(mode="after")
    def _factors(self) -> ScheduleConfig:
        if self.factors is not None and len(self.factors) != len(self.milestones):
            raise ValueError(
                f"factors has {len(self.factors)} values but milestones has {len(self.milestones)}; give one factor "
                "per milestone"
            )
        return self


class TrainConfig(Section):
    epochs: PositiveInt = 100
    batch_size: PositiveInt = 256
    """Images per step on each process; the global batch (learning-rate scaling, steps per epoch) is
    ``batch_size`` x the number of processes under torchrun."""
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    """Seeds every random stream of the run (0 to 2^63 - 1)."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 autocast on CUDA, fp32 on CPU."""
    checkpoint_every: Annotated[int, Field(ge=0)] = 10
    """Save ``epoch_NNNN.safetensors`` every N epochs (0: only ``last``)."""
    checkpoint_every_steps: Annotated[int, Field(ge=0)] = 0
    """Also save ``last`` in the middle of an epoch every N optimizer steps (0: at epoch ends only); ``--resume``
    continues from there exactly, the sampler's position included. For epochs longer than you can afford to lose."""
    checkpoint_every_minutes: Annotated[float, Field(ge=0.0)] = 0.0
    """Also save ``last`` in the middle of an epoch after this many minutes of training since the last save (0: off;
    e.g. 30 on preemptible machines). A stop signal (Ctrl-C, SIGTERM, SIGUSR1) always saves where the run stands."""
    channels_last: bool = False
    """Images and convolution weights in channels-last (NHWC) layout: faster convolutions with bf16 on recent GPUs;
    the arithmetic is the same (``ssl bench`` measures both)."""
    compile: bool = False
    """``torch.compile`` the backbone and its momentum copies (in place: checkpoints and exports are unchanged). The
    first steps take longer while it compiles; measure it with ``ssl bench --set train.compile=true``."""
    sync_batchnorm: bool = False
    """Under torchrun: BatchNorm statistics over the global batch of all processes (SimCLR, BYOL and Barlow
    Twins at scale)."""

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        ok = v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())
        if not ok:
            raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return v


class KnnMonitorConfig(Section):
    """The kNN monitor: the same weighted kNN as ``ssl knn`` (whose ``--k`` / ``--temperature`` these are)."""

    every: Annotated[int, Field(ge=0)] = 1
    """Epochs between kNN evaluations (and held-out scores of the online classifier); the last epoch is always
    evaluated; 0: never."""
    k: PositiveInt = 20
    """Neighbours (20, as solo-learn's and DINO's monitors)."""
    temperature: Annotated[float, Field(gt=0.0)] = 0.07
    """Vote weight exp(similarity / T)."""


class MonitorConfig(Section):
    """Online monitors during pretraining, on when ``ssl pretrain --val DIR`` gives labeled held-out images (and the
    training images have labels too): weighted kNN of the held-out images against the training set every
    ``knn.every`` epochs, and a linear classifier trained on the detached features of the training batches
    (solo-learn's online classifier), scored on the held-out images at the same time."""

    knn: KnnMonitorConfig = KnnMonitorConfig()
    online_linear: bool = True
    """Train the online linear classifier. It sees only detached features: the backbone is trained exactly as
    without it."""
    online_lr: Annotated[float, Field(gt=0.0)] | Literal["auto"] = "auto"
    """The classifier's learning rate at the schedule's peak, no weight decay (``auto``: 0.1, or 1e-3 under
    AdamW or Adam)."""

    def resolved_online_lr(self, optimizer: str) -> float:
        if self.online_lr == "auto":
            return 1e-3 if optimizer in ("adamw", "adam") else 0.1
        return float(self.online_lr)


class Recipe(Section):
    """A fully resolved recipe: what ``ssl pretrain`` runs, saved in the run folder and every checkpoint."""

    recipe: RecipeInfo = RecipeInfo()
    method: SerializeAsAny[MethodConfig]
    backbone: BackboneConfig = BackboneConfig()
    data: DataConfig = DataConfig()
    views: Annotated[list[ViewConfig], Field(min_length=1)] = [ViewConfig(count=2)]
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    monitor: MonitorConfig = MonitorConfig()
    """Online monitors (``ssl pretrain --val``)."""

    @property
    def num_views(self) -> int:
        return sum(v.count for v in self.views)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)
