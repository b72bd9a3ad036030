"""Command-line flags that set a recipe key, with one name each: the key's own (``--epochs`` is ``train.epochs``),
or its section's for the section's ``name`` (``--backbone`` is ``backbone.name``). ``tests/cli/test_names.py`` walks
the commands and the schema and fails on a flag, key or keyword that names a concept otherwise."""

from __future__ import annotations

from typing import Any

RECIPE_FLAGS: dict[str, str] = {
    "backbone": "backbone.name",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "device": "train.device",
    "seed": "train.seed",
    "num_workers": "data.num_workers",
}
"""Python parameter name of the flag -> the recipe key it sets."""


def recipe_overrides(**flags: Any) -> list[tuple[str, Any]]:
    """``(recipe key, value)`` pairs for the flags that were given (not None), in ``load_recipe``'s override form."""
    unknown = sorted(set(flags) - set(RECIPE_FLAGS))
    if unknown:
        raise TypeError(f"not recipe flags: {', '.join(unknown)}")
    return [(RECIPE_FLAGS[name], value) for name, value in flags.items() if value is not None]
