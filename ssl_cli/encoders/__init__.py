"""Encoders that are not stock timm architectures, registered with timm's model registry.

Importing this package registers them, so ``timm.create_model(name)`` builds them like any timm model (and
``ssl_cli.backbones.build_backbone``, ``ssl export``, ``ssl_cli.load_backbone`` take them by name).
``import ssl_cli`` registers them too, as soon as timm is imported (``ssl_cli.__init__``).

- ``amdim_32`` / ``amdim_64`` / ``amdim_128``: AMDIM's encoder (``ssl_cli.encoders.amdim``).
- ``cmc_resnet18`` / ``cmc_resnet50`` / ``cmc_resnet101`` / ``cmc_test_resnet``: CMC's one network per colour view
  (``ssl_cli.encoders.cmc``).

Not a timm model: ``PatchGridFeatures`` (``ssl_cli.encoders.patch_grid``), any encoder read over a grid of patches,
the mean of its pooled patch features (CPC v2's image feature).
"""

from ssl_cli.encoders.amdim import ENCODERS as AMDIM_ENCODERS
from ssl_cli.encoders.amdim import AMDIMEncoder, RKHSHead
from ssl_cli.encoders.cmc import ENCODERS as CMC_ENCODERS
from ssl_cli.encoders.cmc import CMCEncoder
from ssl_cli.encoders.patch_grid import PatchGridFeatures

ENCODERS = (*AMDIM_ENCODERS, *CMC_ENCODERS)

__all__ = [
    "AMDIM_ENCODERS",
    "CMC_ENCODERS",
    "ENCODERS",
    "AMDIMEncoder",
    "CMCEncoder",
    "PatchGridFeatures",
    "RKHSHead",
]
