"""Encoders that are not stock timm architectures, registered with timm's model registry.

Importing this package registers them, so ``timm.create_model(name)`` builds them like any timm model (and
``ssl_cli.backbones.build_backbone``, ``ssl export``, ``ssl_cli.load_backbone`` take them by name).
``import ssl_cli`` registers them too, as soon as timm is imported (``ssl_cli.__init__``).

- ``amdim_32`` / ``amdim_64`` / ``amdim_128``: AMDIM's encoder (``ssl_cli.encoders.amdim``).
"""

from ssl_cli.encoders.amdim import ENCODERS, AMDIMEncoder, RKHSHead

__all__ = ["ENCODERS", "AMDIMEncoder", "RKHSHead"]
