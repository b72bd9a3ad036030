"""fp32 losses under bf16 autocast: every similarity / logit / softmax / Sinkhorn runs in an fp32 region.

Under ``train.precision = "bf16"`` the step runs in ``torch.autocast(device, torch.bfloat16)`` (on the CPU
too); these tests force it on the CPU. Each loss's value and its gradient with respect to its inputs (the
projections, bf16-representable fp32 tensors or bf16 tensors) must match the plain fp32 computation to fp32
precision (``RTOL``), and the same math without the guard (``inspect.unwrap`` of the decorated function, or
the code as it was before the guards) is shown to miss that tolerance by far, so a removed guard fails here.
A tiny method's whole training step is checked the same way from its network's bf16 outputs on.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_method
from ssl_cli.heads import DINOHead
from ssl_cli.losses.amdim import amdim_loss
from ssl_cli.losses.byol import normalized_mse
from ssl_cli.losses.cmc import cross_view_infonce
from ssl_cli.losses.deepclusterv2 import cluster_prediction
from ssl_cli.losses.dino import dino_loss, teacher_probs, updated_center
from ssl_cli.losses.invaspread import invaspread_loss
from ssl_cli.losses.moco import moco_contrastive, moco_logits, positive_first_cross_entropy
from ssl_cli.losses.mocov3 import mocov3_contrastive
from ssl_cli.losses.ntxent import NTXentLoss
from ssl_cli.losses.simsiam import negative_cosine, simsiam_loss
from ssl_cli.losses.swav import prototype_scores, sinkhorn, swapped_prediction
from ssl_cli.losses.yadim import yadim_loss
from ssl_cli.precision import fp32, full_precision
from ssl_cli.runtime import autocast

RTOL = 1e-4
"""fp32 agreement: the guarded loss under autocast repeats the fp32 computation (observed: bit-identical)."""
BF16_EPS = 2.0**-8
"""bf16's unit roundoff (8 significant bits): rounding to bf16 moves a value by at most this fraction. The
precision of a bf16 tensor, such as the backbone's output under autocast."""


def bf16_autocast(device: torch.device = torch.device("cpu")):
    """What ``train.precision = "bf16"`` runs the step in (on the CPU unless told)."""
    return autocast(device, "bf16")


def raw(fn: Callable) -> Callable:
    """The math of ``fn`` without its fp32 guard (and without ``torch.no_grad``): the code before the guards."""
    return inspect.unwrap(fn)


def representable(*shape: int, seed: int, unit: bool = False) -> torch.Tensor:
    """A random fp32 tensor whose values are exact in bf16 (as a bf16 projection cast to fp32 is)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return (F.normalize(x, dim=-1) if unit else x).bfloat16().float()


@dataclass(frozen=True)
class Case:
    """A loss on inputs ``make()``; ``grad``: the inputs that get a gradient; ``old``: the unguarded math."""

    make: Callable[[], dict[str, torch.Tensor]]
    guarded: Callable[..., torch.Tensor]
    old: Callable[..., torch.Tensor]
    grad: tuple[str, ...]
    params: tuple[str, ...] = ()
    """Inputs that are fp32 buffers or parameters in the methods (queues, prototypes, centre): never bf16."""


def _views(n: int, d: int, seed: int, count: int = 2, unit: bool = False) -> dict[str, torch.Tensor]:
    """``count`` correlated views z0, z1, ... of ``n`` images (N x D each): positives are close, as in training."""
    base = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    views = {}
    for v in range(count):
        z = base + 0.5 * torch.randn(n, d, generator=torch.Generator().manual_seed(seed + 1 + v))
        views[f"z{v}"] = (F.normalize(z, dim=1) if unit else z).bfloat16().float()
    return views


def _ntxent(make_negatives: bool) -> Case:
    def make() -> dict[str, torch.Tensor]:
        t = _views(32, 64, seed=0)
        return {**t, "neg": representable(64, 64, seed=9)} if make_negatives else t

    loss = NTXentLoss(0.1)
    return Case(
        make,
        lambda z0, z1, neg=None: loss(z0, z1, neg),
        lambda z0, z1, neg=None: raw(NTXentLoss.forward)(loss, z0, z1, neg),
        ("z0", "z1"),
        ("neg",),
    )


def _moco() -> Case:
    def make() -> dict[str, torch.Tensor]:
        return {**_views(32, 128, seed=1, unit=True), "queue": representable(256, 128, seed=2, unit=True)}

    return Case(
        make,
        lambda z0, z1, queue: moco_contrastive(z0, z1, queue, 0.2),
        lambda z0, z1, queue: raw(positive_first_cross_entropy)(raw(moco_logits)(z0, z1, queue, 0.2)),
        ("z0",),
        ("queue",),
    )


def _swav_scores(score, sink, predict, z0, z1, z2, w) -> torch.Tensor:
    """SwAV's step from the normalised features on: 2 global views with codes, 1 local view, 64 prototypes."""
    scores = [score(v, w) for v in (z0, z1, z2)]
    codes = [sink(s.detach(), 0.05, 3) for s in scores[:2]]
    return predict(scores, codes, 0.1)


def _swav() -> Case:
    return Case(
        lambda: {**_views(32, 32, seed=3, count=3, unit=True), "w": representable(64, 32, seed=4, unit=True)},
        lambda **t: _swav_scores(prototype_scores, sinkhorn, swapped_prediction, **t),
        lambda **t: _swav_scores(lambda z, w: z @ w.T, raw(sinkhorn), raw(swapped_prediction), **t),
        ("z0", "z1", "z2", "w"),
        ("w",),
    )


def _deepclusterv2() -> Case:
    def make() -> dict[str, torch.Tensor]:
        targets = torch.randint(-1, 40, (2, 16), generator=torch.Generator().manual_seed(5))  # -1: no cluster yet
        z = torch.cat(list(_views(16, 32, seed=6, count=3, unit=True).values()))  # 3 views x 16 images
        return {"z": z, "w1": representable(40, 32, seed=7, unit=True), "w2": representable(50, 32, seed=8, unit=True),
                "targets": targets}  # fmt: skip

    return Case(
        make,
        lambda z, w1, w2, targets: cluster_prediction([prototype_scores(z, w1), prototype_scores(z, w2)], targets, 0.1),
        lambda z, w1, w2, targets: raw(cluster_prediction)([z @ w1.T, z @ w2.T], targets, 0.1),
        ("z",),
        ("w1", "w2", "targets"),
    )


def _dino_head() -> DINOHead:
    """A DINO head whose MLP is the identity, so its input is the bottleneck: only the fp32 region remains."""
    torch.manual_seed(0)
    head = DINOHead(16, 256, hidden_dim=32, bottleneck_dim=16)
    head.mlp = torch.nn.Identity()
    return head


def _dino_step(logits, probs, loss, z0, z1, z2, t0, t1, center) -> torch.Tensor:
    """DINO from the bottleneck on: 3 student views (2 global, 1 local), the teacher's 2 global views."""
    with torch.no_grad():
        targets = probs(logits(torch.cat([t0, t1])), center, 0.04).chunk(2)
    return loss([logits(z) for z in (z0, z1, z2)], list(targets), 0.1)


def _dino() -> Case:
    head = _dino_head()

    def make() -> dict[str, torch.Tensor]:
        teacher = {f"t{i}": v for i, v in enumerate(_views(16, 16, seed=10).values())}
        return {**_views(16, 16, seed=11, count=3), **teacher, "center": 0.1 * representable(1, 256, seed=12)}

    def old_logits(h: torch.Tensor) -> torch.Tensor:  # DINOHead.forward before the guard
        return head.last_layer(F.normalize(head.mlp(h), dim=-1))

    return Case(
        make,
        lambda **t: _dino_step(head, teacher_probs, dino_loss, **t),
        lambda **t: _dino_step(old_logits, raw(teacher_probs), raw(dino_loss), **t),
        ("z0", "z1", "z2"),
        ("center",),
    )


CASES = {
    "ntxent": _ntxent(False),
    "ntxent-negatives": _ntxent(True),
    "moco-queue": _moco(),
    "mocov3": Case(
        lambda: _views(32, 64, seed=13),
        lambda z0, z1: mocov3_contrastive(z0, z1, 0.2),
        lambda z0, z1: raw(mocov3_contrastive)(z0.float(), z1.float(), 0.2),  # the old .float() casts
        ("z0",),
    ),
    "invaspread": Case(
        lambda: _views(32, 64, seed=14),
        lambda z0, z1: invaspread_loss(z0, z1, 0.1),
        lambda z0, z1: raw(invaspread_loss)(z0.float(), z1.float(), 0.1),
        ("z0", "z1"),
    ),
    "swav": _swav(),
    "deepclusterv2": _deepclusterv2(),
    "dino": _dino(),
    # BYOL / SimSiam: cosine similarities only; CUDA autocast already ran those in fp32, the CPU did not
    "byol": Case(
        lambda: _views(32, 64, seed=15),
        lambda z0, z1: normalized_mse(z0, z1.detach()).mean(),
        lambda z0, z1: raw(normalized_mse)(z0, z1.detach()).mean(),
        ("z0",),
    ),
    "simsiam": Case(
        lambda: {**_views(32, 64, seed=16), **{f"p{i}": v for i, v in enumerate(_views(32, 64, seed=17).values())}},
        lambda z0, z1, p0, p1: simsiam_loss(p0, p1, z0, z1),
        lambda z0, z1, p0, p1: 0.5 * raw(negative_cosine)(p0, z1) + 0.5 * raw(negative_cosine)(p1, z0),
        ("p0", "p1"),
    ),
}


def loss_and_grads(
    fn: Callable[..., torch.Tensor], case: Case, bf16_inputs: bool = False, amp: bool = True
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``fn``'s loss on the case's inputs (under bf16 autocast when ``amp``) and its gradients w.r.t. ``case.grad``;
    with ``bf16_inputs`` every input but the case's fp32 buffers / parameters arrives as a bf16 tensor."""
    inputs = {}
    for name, t in case.make().items():
        if bf16_inputs and t.is_floating_point() and name not in case.params:
            t = t.bfloat16()
        inputs[name] = t.requires_grad_(name in case.grad)
    with bf16_autocast() if amp else full_precision("cpu"):
        loss = fn(**inputs)
    grads = torch.autograd.grad(loss, [inputs[name] for name in case.grad])
    return loss.detach(), list(grads)


def reference(case: Case) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The plain fp32 computation (no autocast) on the same values."""
    return loss_and_grads(case.guarded, case, amp=False)


def assert_fp32_close(got: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    """Element-wise agreement to ``rtol``, with an absolute floor of ``rtol`` times the largest reference entry."""
    got, ref = got.detach().float(), ref.detach().float()
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_gradient_match_fp32_under_bf16_autocast(name: str) -> None:
    case = CASES[name]
    ref_loss, ref_grads = reference(case)
    loss, grads = loss_and_grads(case.guarded, case)
    assert loss.dtype == torch.float32
    assert_fp32_close(loss, ref_loss)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float32
        assert_fp32_close(g, ref)


# Without the guards (the math as it was), on these inputs, relative error of the gradient (norm) against fp32:
# NT-Xent 9.8e-3 (8.9e-3 with extra negatives), MoCo queue 2.5e-4, MoCo v3 6.2e-3, InvaSpread 2.1e-1 (its
# log(1 - P) sums ran in bf16 on the CPU), SwAV 6.7e-3, DeepCluster v2 3.0e-3, DINO 1.0e-2; with the guards 0.
# BYOL / SimSiam: 0 with fp32 inputs (autocast leaves their cosines in fp32); see the bf16-input test below.
@pytest.mark.parametrize("name", [n for n in CASES if n not in ("byol", "simsiam")])
def test_without_the_guard_the_gradient_misses_fp32_precision(name: str) -> None:
    case = CASES[name]
    _, ref_grads = reference(case)
    _, old_grads = loss_and_grads(case.old, case)
    with pytest.raises(AssertionError):
        for g, ref in zip(old_grads, ref_grads, strict=True):
            assert_fp32_close(g, ref)


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_projections_give_an_fp32_loss_and_gradients_to_bf16_precision(name: str) -> None:
    """Projections that arrive as bf16 tensors: the loss is the fp32 loss of their values; their gradients are
    the fp32 gradients to bf16 precision (the precision of the tensors they belong to)."""
    case = CASES[name]
    ref_loss, ref_grads = reference(case)  # the same values, in fp32
    loss, grads = loss_and_grads(case.guarded, case, bf16_inputs=True)
    assert loss.dtype == torch.float32
    assert_fp32_close(loss, ref_loss)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert_fp32_close(g, ref, rtol=BF16_EPS)
    if name in ("byol", "simsiam"):  # unguarded, the CPU's autocast ran their cosines in bf16: 3e-3 to 7e-3 off
        old_loss, _ = loss_and_grads(case.old, case, bf16_inputs=True)
        with pytest.raises(AssertionError):
            assert_fp32_close(old_loss, ref_loss)


def test_sinkhorn_codes_of_bf16_scores_are_fp32() -> None:
    scores = representable(64, 32, seed=20, unit=True) @ representable(16, 32, seed=21, unit=True).T
    with bf16_autocast():
        codes = sinkhorn(scores.bfloat16(), 0.05, 3)
    assert codes.dtype == torch.float32
    assert_fp32_close(codes, sinkhorn(scores.bfloat16().float(), 0.05, 3))


def test_dino_head_logits_in_fp32_after_its_bf16_mlp() -> None:
    """The head's MLP runs in bf16 under autocast; its normalisation and last layer (the logits) in fp32."""
    torch.manual_seed(0)
    head = DINOHead(24, 512, hidden_dim=32, bottleneck_dim=16)
    x = representable(8, 24, seed=22)
    with bf16_autocast():
        logits = head(x)
        h = head.mlp(x)  # bf16: the precision the logits' input has
        old = head.last_layer(F.normalize(h, dim=-1))  # before the guard
    assert h.dtype == torch.bfloat16 and logits.dtype == torch.float32
    ref = head.last_layer(F.normalize(h.float(), dim=-1))
    assert_fp32_close(logits, ref)
    with pytest.raises(AssertionError):  # each logit rounded to bf16: up to 2^-8 of it, 39 times the tolerance
        assert_fp32_close(old, ref)


def test_dino_center_update_in_fp32_from_bf16_teacher_outputs() -> None:
    center = 0.1 * representable(1, 256, seed=23)
    teacher = representable(32, 256, seed=24)
    with bf16_autocast():
        new = updated_center(center, teacher.bfloat16(), 0.9)
    assert new.dtype == torch.float32
    assert_fp32_close(new, center * 0.9 + teacher.mean(dim=0, keepdim=True) * 0.1)


def test_fp32_decorator_casts_nested_half_tensors_and_keeps_fp64() -> None:
    @fp32
    def dtypes(a, pair, *, c):
        assert not torch.is_autocast_enabled("cpu")
        return a.dtype, [t.dtype for t in pair], c.dtype, (a @ a.T).dtype

    a = torch.ones(2, 2, dtype=torch.bfloat16)
    with bf16_autocast():
        got = dtypes(a, [a.half(), a.double()], c=a)
        assert torch.is_autocast_enabled("cpu")  # restored after the region
    assert got == (torch.float32, [torch.float32, torch.float64], torch.float32, torch.float32)


# The method-level check: a tiny method's whole training step under bf16 autocast, the loss's gradient on the
# output of the modules that end the bf16 part of the step (everything after them runs in fp32), against the fp32
# step from the same outputs; and, with the method's guard removed, the same check failing.
def _old_dino_head(self: DINOHead, x: torch.Tensor) -> torch.Tensor:
    return self.last_layer(F.normalize(self.mlp(x), dim=-1))  # DINOHead.forward before its guard


@dataclass(frozen=True)
class MethodCase:
    overrides: tuple
    modules: tuple[str, ...]
    """The modules whose (bf16) outputs the check holds fixed."""
    unguarded: tuple[tuple[str, str, Callable], ...]
    """``(module, attribute, replacement)``: the guard to remove (monkeypatch) and the math without it."""


SMALL_HEAD = (("method.proj_hidden_dim", 32), ("method.proj_output_dim", 16))
METHODS = {
    "simclr": MethodCase(
        (), ("projector",), (("ssl_cli.losses.ntxent.NTXentLoss", "forward", raw(NTXentLoss.forward)),)
    ),
    "mocov2": MethodCase(
        (("method.queue_size", 256),),
        ("projector", "key_projector"),
        (("ssl_cli.methods.mocov1", "moco_logits", raw(moco_logits)),
         ("ssl_cli.methods.mocov1", "positive_first_cross_entropy", raw(positive_first_cross_entropy))),
    ),
    "swav": MethodCase(
        (*SMALL_HEAD, ("method.num_prototypes", 30), ("views.1.count", 1), ("views.1.size", 16)),
        ("projector",),
        (("ssl_cli.methods.swav", "prototype_scores", lambda z, w: z @ w.T),),
    ),
    "dino-resnet-cifar": MethodCase(
        (*SMALL_HEAD, ("backbone.small_stem", False), ("method.num_prototypes", 64),
         ("views", [{"count": 1, "size": 32}, {"count": 1, "size": 32}, {"count": 1, "size": 16}])),
        ("head.mlp", "teacher_head.mlp"),
        (("ssl_cli.heads.DINOHead", "forward", _old_dino_head),),
    ),
    # AMDIM: r1 (the backbone's output through rkhs_1, an identity here) and the 5x5 / 7x7 embeddings
    "amdim": MethodCase(
        (), ("rkhs_1", "rkhs_5", "rkhs_7"), (("ssl_cli.methods.amdim", "amdim_loss", raw(amdim_loss)),)
    ),
    # YADIM: no head, the loss reads the backbone's last feature map (test_resnet: layer4)
    "yadim": MethodCase((), ("backbone.layer4",), (("ssl_cli.methods.yadim", "yadim_loss", raw(yadim_loss)),)),
    # CMC with in-batch negatives: each view's embedding head on its own network
    "cmc": MethodCase(
        (("backbone.name", "cmc_test_resnet"), ("method.loss", "infonce")), ("projectors.0", "projectors.1"),
        (("ssl_cli.methods.cmc", "cross_view_infonce", raw(cross_view_infonce)),),
    ),
}  # fmt: skip


def step_with_fixed_outputs(
    method, views, modules: tuple[str, ...], amp: bool, fixed: dict | None = None, device=torch.device("cpu")
):
    """One ``training_step``; returns its loss, the outputs of ``modules`` (one per call, in call order) and the
    loss's gradients on those of them that need one. Under ``amp`` the step runs in bf16 autocast; otherwise in
    fp32, with each module's outputs replaced by ``fixed``'s (the bf16 step's, cast to fp32): the same values."""
    outputs: dict[str, list[torch.Tensor]] = {m: [] for m in modules}

    def hook(name: str):
        def record(_module, _inputs, out):
            if fixed is not None:
                bf16_out = fixed[name][len(outputs[name])]
                out = bf16_out.detach().float().requires_grad_(bf16_out.requires_grad)
            outputs[name].append(out)
            return out

        return record

    handles = [method.get_submodule(m).register_forward_hook(hook(m)) for m in modules]
    torch.manual_seed(0)  # the same random choices (MoCo's shuffle-BN permutation) in both steps
    try:
        with bf16_autocast(device) if amp else full_precision(device):
            loss = method.training_step(views, 0).loss
    finally:
        for h in handles:
            h.remove()
    leaves = [o for m in modules for o in outputs[m] if o.requires_grad]
    return loss, outputs, torch.autograd.grad(loss, leaves)


def method_grads(
    name: str, device: torch.device = torch.device("cpu")
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The loss and its gradients on the bf16 outputs of ``METHODS[name]``'s modules, in the bf16 autocast step
    and in the fp32 step from the same outputs, on ``device``: ``(loss, ref_loss, grads, ref_grads)``."""
    overrides, modules = METHODS[name].overrides, METHODS[name].modules
    method = tiny_method(name, ("train.batch_size", 16), *overrides).to(device)
    g = torch.Generator().manual_seed(0)
    images = {s: torch.randn(16, 3, s, s, generator=g).to(device) for s in {v.size for v in method.recipe.views}}
    # every crop a slightly perturbed copy of its image: positives agree, as they come to in training
    views = [images[v.size] + 0.1 * torch.randn(images[v.size].shape, generator=g).to(device)
             for v in method.recipe.views for _ in range(v.count)]  # fmt: skip
    loss, outputs, grads = step_with_fixed_outputs(method, views, modules, amp=True, device=device)
    assert all(o.dtype == torch.bfloat16 for m in modules for o in outputs[m])  # the network did run in bf16
    ref_loss, _, ref_grads = step_with_fixed_outputs(method, views, modules, amp=False, fixed=outputs, device=device)
    return loss.detach(), ref_loss.detach(), list(grads), list(ref_grads)


def assert_rounded_from(got: torch.Tensor, ref: torch.Tensor) -> None:
    """``got`` (bf16) is ``ref`` (fp32) rounded to bf16 once or twice: within 2 x 2^-8 of each element."""
    torch.testing.assert_close(got.float(), ref, rtol=2 * BF16_EPS, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("name", list(METHODS))
def test_training_step_under_bf16_autocast_is_fp32_from_the_network_outputs_on(name: str) -> None:
    """Loss in fp32 and equal to the fp32 step's; its gradient on the network's bf16 outputs is the fp32
    gradient to the precision of those outputs (observed: within 1 x 2^-8, the bound for one rounding)."""
    loss, ref_loss, grads, ref_grads = method_grads(name)
    assert loss.dtype == torch.float32
    assert_fp32_close(loss, ref_loss)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert_rounded_from(g, ref)


@pytest.mark.parametrize("name", list(METHODS))
def test_training_step_without_its_guard_misses_that_precision(name: str, monkeypatch) -> None:
    """The same check with the method's fp32 guard removed: the gradient is off by 38 (MoCo v2's queue logits) to
    890 (SwAV's scores) times the tolerance on some elements."""
    for target, attribute, replacement in METHODS[name].unguarded:
        monkeypatch.setattr(target + "." + attribute, replacement)
    _, _, grads, ref_grads = method_grads(name)
    with pytest.raises(AssertionError):
        for g, ref in zip(grads, ref_grads, strict=True):
            assert_rounded_from(g, ref)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(METHODS))
def test_on_the_gpu_the_bf16_step_is_fp32_from_the_network_outputs_on(name: str, gpu: torch.device) -> None:
    """The same check under CUDA's bf16 autocast (what ``train.precision = "auto"`` runs on a GPU): each family's loss
    in fp32, its gradient on the network's bf16 outputs the fp32 one to the precision of those outputs."""
    loss, ref_loss, grads, ref_grads = method_grads(name, gpu)
    assert loss.dtype == torch.float32 and loss.device.type == gpu.type
    assert_fp32_close(loss, ref_loss)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert_rounded_from(g, ref)
