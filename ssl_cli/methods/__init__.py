"""Self-supervised methods, one file each. A method file registers its class with ``@register``; importing this
package imports every module in it, so a new file is found without an import list to edit."""

import importlib
import pkgutil

from ssl_cli.methods.base import Method, StepOutput
from ssl_cli.methods.registry import METHODS, get_method, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "StepOutput", "get_method", "register"]
