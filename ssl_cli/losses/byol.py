"""BYOL's regression loss: the mean squared error between L2-normalised prediction and target.

[0] BYOL, Grill et al. 2020, arXiv:2006.07733, Eq. (2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_cli.precision import fp32


@fp32  # on CUDA autocast runs cosine_similarity in fp32 but on the CPU in bf16: fp32 on both
def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per sample ``|| p/||p|| - z/||z|| ||^2 = 2 - 2 cos(p, z)``; p, z: N x D. Returns N values.

    The target ``z`` is used as given: detach it (stop-gradient) before calling.
    """
    return 2.0 - 2.0 * F.cosine_similarity(p, z, dim=-1)
