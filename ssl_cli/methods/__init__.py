"""Self-supervised methods, one file each; importing this package registers them."""

from ssl_cli.methods import mocov2, simclr  # noqa: F401
from ssl_cli.methods import simclrv2  # noqa: F401
from ssl_cli.methods import instdisc, invaspread  # noqa: F401
from ssl_cli.methods import mocov1  # noqa: F401
from ssl_cli.methods import barlowtwins  # noqa: F401
from ssl_cli.methods import byol, simsiam  # noqa: F401
from ssl_cli.methods.base import Method, StepOutput
from ssl_cli.methods.registry import METHODS, get_method, register

__all__ = ["METHODS", "Method", "StepOutput", "get_method", "register"]
