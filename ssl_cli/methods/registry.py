"""The method registry: recipe ``method.name`` -> method class (and its config model)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ssl_cli.errors import RecipeError

if TYPE_CHECKING:
    from ssl_cli.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under its config's ``name``."""
    name = cls.Config.model_fields["name"].default
    if not isinstance(name, str) or name in METHODS:
        raise ValueError(f"method {cls.__name__}: config needs a unique default name, got {name!r}")
    METHODS[name] = cls
    return cls


def get_method(name: object) -> type[Method]:
    import ssl_cli.methods  # noqa: F401  (registers the built-in methods)

    if not isinstance(name, str) or name not in METHODS:
        raise RecipeError(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name]
