"""ssl: self-supervised visual representation learning on timm backbones.

The command-line app is ``ssl`` (see ``ssl --help``); the Python package is ``ssl_cli`` because a package
named ``ssl`` would shadow the standard library.
"""

__version__ = "0.1.0"


def load_backbone(path: str, device: str = "cpu"):
    """Rebuild a backbone from an exported ``backbone.safetensors`` or a training checkpoint.

    Works for every backbone ``ssl`` trains, including changed stems that plain ``timm.create_model``
    cannot rebuild. Returns the timm model (``num_classes=0``) in eval mode.
    """
    from ssl_cli.artifacts.backbone import load_backbone as _load

    return _load(path, device=device)


__all__ = ["__version__", "load_backbone"]
