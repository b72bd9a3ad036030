"""One name per concept across the command line, the recipe schema and the Python entry points.

Walks every ``ssl`` command's parameters, every key of the recipe schema (each registered method's ``[method]``
keys included) and the keywords of the library functions the commands call, and fails on a new drift: a flag
named otherwise than its parameter, a concept under two names (``out`` / ``out_dir``, ``momentum`` /
``tau_base``, ``k`` / ``knn_k``, ...), a typed recipe flag whose name is not its key's.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from collections import defaultdict
from typing import get_args

import pydantic
import pytest
import typer.main

import ssl_cli.cli as cli_package
from ssl_cli.cli.app import app
from ssl_cli.cli.flags import RECIPE_FLAGS
from ssl_cli.config.load import RENAMED
from ssl_cli.config.schema import Recipe
from ssl_cli.methods.registry import METHODS

# a parameter whose flag is not its own name, and why
FLAG_EXCEPTIONS = {
    "as_json": "--json",  # `json` would shadow the module
    "overrides": "--set",  # --set KEY=VALUE, repeatable: the list of overrides
    "fmt": "--format",  # `format` is a builtin
}

# names of one concept: the first is the one in use; none of the others may appear anywhere
SYNONYMS = [
    ("out", "out_dir", "output", "out_file", "output_dir", "out_path", "output_path", "dest"),
    ("momentum", "momentum_base", "tau_base", "ema", "ema_decay", "ema_momentum", "base_momentum"),
    ("momentum_final", "tau_final", "final_momentum", "momentum_end", "momentum_max"),
    ("k", "knn_k", "num_neighbors", "n_neighbors", "top_k", "neighbours"),
    ("temperature", "temp", "tau", "knn_temperature", "knn_temp"),
    ("every", "knn_every", "eval_every", "knn_interval"),
    ("optim", "optimizer", "opt", "optimizer_name"),
    ("warmup_steps", "warmup", "warmup_iters", "warmup_iterations"),
    ("warmup_epochs", "warm_epochs", "warmup_epoch"),
    ("epochs", "num_epochs", "max_epochs", "n_epochs"),
    ("batch_size", "bs", "batch"),
    ("num_workers", "workers", "n_workers", "loader_workers"),
    ("lr", "learning_rate", "base_lr"),
    ("weight_decay", "wd"),
    ("checkpoint", "ckpt", "checkpoint_path", "path", "weights"),
    ("recipe", "spec", "recipe_name", "config_file"),
    ("seed", "random_seed"),
    ("log", "note", "logger", "print_fn"),
    ("x_axis", "x", "xaxis"),
    ("num_images", "max_images", "n_images", "images_count"),
    ("num_queries", "n_queries", "max_queries"),
    ("num_prototypes", "n_prototypes", "nmb_prototypes", "prototypes"),
    ("queue_size", "queue_length", "queue_len"),
    ("random_init", "untrained", "random_weights"),
    ("output_view", "view", "out_view", "eval_view", "feature_view", "encoder_view"),
]


def _commands(command, path=""):
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _commands(sub, f"{path} {name}".strip())
    else:
        yield path, command


COMMANDS = dict(_commands(typer.main.get_command(app)))


def _models(annotation) -> list[type[pydantic.BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models(arg)]


def schema_keys() -> dict[str, set[str]]:
    """Dotted recipe key -> where it is (``method[NAME].key`` for a method's own)."""
    keys: dict[str, set[str]] = defaultdict(set)

    def walk(model: type[pydantic.BaseModel], prefix: str, where: str) -> None:
        for name, field in model.model_fields.items():
            keys[prefix + name].add(where)
            for sub in _models(field.annotation):
                walk(sub, f"{prefix}{name}.", where)

    walk(Recipe, "", "schema")
    for method, cls in METHODS.items():
        walk(cls.Config, "method.", f"method[{method}]")
    return keys


def entry_points() -> dict[str, inspect.Signature]:
    """The library functions the commands import (``from ssl_cli.X import f`` in ``ssl_cli/cli/*.py``)."""
    found = {}
    for info in pkgutil.iter_modules(cli_package.__path__):
        source = inspect.getsource(importlib.import_module(f"ssl_cli.cli.{info.name}"))
        for module, names in re.findall(r"from (ssl_cli\.(?!cli\b)[\w.]+) import ([\w, ]+)", source):
            lib = importlib.import_module(module)
            for name in (n.strip().split(" as ")[0] for n in names.split(",")):
                obj = getattr(lib, name, None)
                if inspect.isfunction(obj):
                    found[f"{module}.{name}"] = inspect.signature(obj)
    return found


def vocabulary() -> dict[str, set[str]]:
    """Every name a user or caller meets -> where."""
    names: dict[str, set[str]] = defaultdict(set)
    for path, command in COMMANDS.items():
        for param in command.params:
            names[param.name].add(f"ssl {path}")
            for opt in param.opts:
                if opt.startswith("--"):
                    names[opt[2:].replace("-", "_")].add(f"ssl {path} {opt}")
    for key, where in schema_keys().items():
        names[key.rsplit(".", 1)[-1]].update(f"{w}: {key}" for w in where)
    for function, signature in entry_points().items():
        for param in signature.parameters:
            names[param].add(function)
    return names


def test_the_walk_sees_every_layer() -> None:
    """The parity tests below are only as good as what they walk."""
    names = vocabulary()
    assert {"pretrain", "knn", "linear-probe", "export", "transfer", "bench", "plot curves"} <= set(COMMANDS)
    assert "ssl_cli.train.launch.run_pretraining" in entry_points()
    assert "ssl_cli.transfer.run.run_transfer" in entry_points()
    assert any("method[byol]" in w for w in names["momentum"]) and any("schema" in w for w in names["k"])


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_flag_is_named_as_its_parameter(path: str) -> None:
    for param in COMMANDS[path].params:
        longs = [o for o in param.opts if o.startswith("--")]
        if not longs:
            continue  # a positional argument
        expected = FLAG_EXCEPTIONS.get(param.name, "--" + param.name.replace("_", "-"))
        assert longs[0] == expected, f"ssl {path}: {longs[0]} is parameter {param.name!r}; name them alike"


@pytest.mark.parametrize("group", SYNONYMS, ids=[g[0] for g in SYNONYMS])
def test_no_concept_goes_by_two_names(group: tuple[str, ...]) -> None:
    names = vocabulary()
    aliases = {opt for c in COMMANDS.values() for p in c.params for opt in p.opts[1:] if opt.startswith("--")}
    for other in group[1:]:
        # a kept old flag (an alias after the first) still parses; everywhere else the name is a drift
        where = {w for w in names.get(other, ()) if not any(w.endswith(" " + a) for a in aliases)}
        assert not where, f"{other!r} names what is called {group[0]!r}, in: {', '.join(sorted(where))}"


@pytest.mark.parametrize("flag", sorted(RECIPE_FLAGS))
def test_a_typed_recipe_flag_is_named_after_its_key(flag: str) -> None:
    key = RECIPE_FLAGS[flag]
    assert key in schema_keys(), f"--{flag} sets {key}, which the schema does not have"
    section, leaf = key.rsplit(".", 1)
    assert leaf == flag or (leaf == "name" and section == flag), f"--{flag} sets {key}: name one after the other"
    for path in ("pretrain", "bench"):
        params = {p.name: p for p in COMMANDS[path].params}
        if flag in params:
            assert key in (params[flag].help or ""), f"ssl {path} --{flag}: its help should name {key}"


def test_old_names_are_not_keys_any_more_and_their_new_names_are() -> None:
    keys = schema_keys()
    renamed = dict(RENAMED)
    for cls in METHODS.values():
        renamed.update({f"method.{a}": f"method.{b}" for a, b in getattr(cls.Config, "renamed", {}).items()})
    for old, new in renamed.items():
        assert new in keys, f"{old} -> {new}: no such key"
        assert old not in keys, f"{old} is renamed to {new} but is still a key"


def test_kept_old_flags_still_parse() -> None:
    """Renamed flags keep their old spelling as an alias after the new one."""
    opts = {(path, p.name): p.opts for path, command in COMMANDS.items() for p in command.params}
    assert opts[("transfer", "optim")] == ["--optim", "--optimizer"]
    assert opts[("plot embedding", "num_images")] == ["--num-images", "--max-images"]
    assert opts[("bench", "warmup_steps")] == ["--warmup-steps", "--warmup"]
