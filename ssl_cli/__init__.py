"""ssl: self-supervised visual representation learning on timm backbones.

The command-line app is ``ssl`` (see ``ssl --help``); the Python package is ``ssl_cli`` because a package
named ``ssl`` would shadow the standard library.
"""

import sys

__version__ = "0.1.0"


def load_backbone(path: str, device: str = "cpu", output_view: str | None = None):
    """Rebuild a backbone from an exported ``backbone.safetensors`` or a training checkpoint.

    Works for every backbone ``ssl`` trains, including changed stems that plain ``timm.create_model``
    cannot rebuild. Returns the timm model (``num_classes=0``) in eval mode. ``output_view`` (CMC's encoders):
    ``"all"`` or one colour view's name (e.g. ``"L"``); None keeps the file's own.

    A CPC v2 checkpoint or export returns the paper's image feature instead: a ``PatchGridFeatures`` that cuts the
    image into the training grid and averages the timm encoder's pooled patch features (its ``.encoder`` is the
    timm model).
    """
    from ssl_cli.artifacts.backbone import load_backbone as _load

    return _load(path, device=device, output_view=output_view)


def _register_encoders_with_timm() -> None:
    """ssl's own encoders (``ssl_cli.encoders``: AMDIM's, CMC's) join timm's model registry as soon as timm is
    imported, so after ``import ssl_cli``, ``timm.create_model("amdim_32")`` works whichever of the two was imported
    first.

    Importing timm here would cost every ``ssl`` command the start-up of torch and timm, so when timm is not loaded
    yet, a finder waits for its import and registers the encoders right after timm's own module has run.
    """
    if "timm" in sys.modules:
        import ssl_cli.encoders  # noqa: F401
    elif not any(isinstance(f, _AfterTimm) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTimm())


class _AfterTimm:
    """A meta-path finder for ``timm`` alone: it lets the other finders find timm, then runs the encoders' import
    after timm's module (once; it removes itself)."""

    def find_spec(self, name: str, path=None, target=None):
        if name != "timm":
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_timm = spec.loader.exec_module

        def exec_module(module) -> None:
            run_timm(module)
            try:
                import ssl_cli.encoders  # noqa: F401
            except Exception as e:  # noqa: BLE001 - never break the user's timm import over our encoders
                import warnings

                warnings.warn(f"ssl_cli: encoders not registered with timm ({type(e).__name__}: {e})", stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


_register_encoders_with_timm()

__all__ = ["__version__", "load_backbone"]
