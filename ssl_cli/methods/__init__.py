"""Self-supervised methods, one file each; importing this package registers them."""

from ssl_cli.methods import (  # noqa: F401  (importing a method module registers it)
    barlowtwins,
    byol,
    deepclusterv2,
    dino,
    instdisc,
    invaspread,
    mocov1,
    mocov2,
    mocov3,
    simclr,
    simclrv2,
    simsiam,
    swav,
)
from ssl_cli.methods.base import Method, StepOutput
from ssl_cli.methods.registry import METHODS, get_method, register

__all__ = ["METHODS", "Method", "StepOutput", "get_method", "register"]
