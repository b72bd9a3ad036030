"""Projector / predictor MLPs built from a spec: depth, output BatchNorm, the none / linear / mlp ablation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssl_cli.heads import ProjectorConfig, mlp, projector


def cfg(**kw) -> ProjectorConfig:
    return ProjectorConfig(name="x", proj_hidden_dim=16, proj_output_dim=8, **kw)


def linears(m: nn.Module) -> list[nn.Linear]:
    return [x for x in m.modules() if isinstance(x, nn.Linear)]


def test_mlp_layout():
    m = mlp([4, 16, 16, 8])
    kinds = [type(x).__name__ for x in m]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    # a hidden linear layer followed by BatchNorm needs no bias; the output layer keeps one
    assert [x.bias is not None for x in linears(m)] == [False, False, True]


@pytest.mark.parametrize("layers", [2, 3, 4])
def test_projector_depth(layers: int):
    module, dim = projector(cfg(proj_layers=layers), 32)
    dims = [(x.in_features, x.out_features) for x in linears(module)]
    assert dim == 8 and len(dims) == layers
    assert dims[0] == (32, 16) and dims[-1] == (16, 8)


def test_projector_output_batchnorm_plain_and_affine():
    plain, _ = projector(cfg(proj_layers=3, proj_last_batchnorm="plain"), 32)
    assert isinstance(plain[-1], nn.BatchNorm1d) and not plain[-1].affine
    assert linears(plain)[-1].bias is None  # BN follows: a bias would be cancelled
    affine, _ = projector(cfg(proj_last_batchnorm="affine"), 32)
    assert isinstance(affine[-1], nn.BatchNorm1d) and affine[-1].affine
    plain.train()
    z = plain(torch.randn(64, 32))
    # a parameter-free BN output is standardised per feature over the batch
    assert torch.allclose(z.mean(0), torch.zeros(8), atol=1e-5)
    assert torch.allclose(z.var(0, unbiased=False), torch.ones(8), atol=1e-3)


def test_projector_none_and_linear():
    ident, dim = projector(cfg(projector="none"), 32)
    assert isinstance(ident, nn.Identity) and dim == 32
    lin, dim = projector(cfg(projector="linear"), 32)
    assert isinstance(lin, nn.Linear) and dim == 8


def test_scale_only_output_batchnorm_has_a_gain_and_no_shift() -> None:
    from ssl_cli.heads import ScaleBatchNorm1d

    head, _ = projector(cfg(proj_last_batchnorm="scale"), 32)
    bn = head[-1]
    assert isinstance(bn, ScaleBatchNorm1d) and bn.bias is None and bn.weight.shape == (8,)
    assert linears(head)[-1].bias is None
    assert [n for n, _ in bn.named_parameters()] == ["weight"]
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, 8))
    head.train()
    z = head(torch.randn(64, 32))
    # standardised per feature, then scaled by the gain; the mean stays 0 (no shift to learn)
    assert torch.allclose(z.mean(0), torch.zeros(8), atol=1e-5)
    assert torch.allclose(z.std(0, unbiased=False), torch.linspace(0.5, 2.0, 8), rtol=1e-3)


def test_simclr_and_byol_heads_match_the_official_last_layers() -> None:
    from conftest import tiny_method

    simclr = tiny_method("simclr", ("method.proj_hidden_dim", 16), ("method.proj_output_dim", 8))
    assert type(simclr.projector[-1]).__name__ == "ScaleBatchNorm1d" and linears(simclr.projector)[-1].bias is None
    byol = tiny_method("byol", ("method.proj_hidden_dim", 16), ("method.pred_hidden_dim", 16))
    assert linears(byol.projector)[-1].bias is None and linears(byol.predictor)[-1].bias is None
    assert linears(byol.projector)[0].bias is None  # a BatchNorm follows the hidden layer
    # a user's BYOL recipe that asks for the bias gets it
    biased = tiny_method("byol", ("method.proj_hidden_dim", 16), ("method.proj_last_bias", True))
    assert linears(biased.projector)[-1].bias is not None and linears(biased.predictor)[-1].bias is not None
