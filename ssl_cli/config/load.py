"""Load a recipe: built-in name or TOML path, ``extends`` chains, ``--set a.b=value`` overrides, validation.

Errors come out as one line naming the file (or ``--set``), the dotted key, what was wrong and what is valid.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from ssl_cli.config.schema import Recipe
from ssl_cli.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def recipes_dir() -> Path:
    """Folder of the built-in recipes: ``ssl_cli/recipes`` in an installed wheel, top-level ``recipes/`` in a
    source checkout (editable installs included)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "recipes"
    return installed if installed.is_dir() else package.parent / "recipes"


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.toml"))


def _locate(spec: str, relative_to: Path | None = None) -> Path:
    path = Path(spec).expanduser()
    if spec.endswith(".toml") or path.suffix or "/" in spec:
        if not path.is_absolute() and relative_to is not None and not path.exists():
            path = relative_to / path
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {spec}")
        return path
    builtin = recipes_dir() / f"{spec}.toml"
    if not builtin.is_file():
        raise RecipeError(f"unknown recipe {spec!r}; valid: {', '.join(builtin_recipes())} (or a path to a .toml file)")
    return builtin


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: invalid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read recipe: {e}") from None


def _merge(base: dict, top: dict) -> dict:
    """Deep-merge ``top`` into a copy of ``base``: tables merge key by key, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _leaves(d: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        for i, v in enumerate(d):
            yield from _leaves(v, f"{prefix}{i}.")
    yield prefix.rstrip(".")


def _load_raw(path: Path, chain: tuple[Path, ...], origins: dict[str, str]) -> dict[str, Any]:
    if path.resolve() in chain:
        names = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise RecipeError(f"{path}: 'extends' forms a cycle: {names}")
    data = _read_toml(path)
    parent_spec = data.pop("extends", None)
    if parent_spec is None:
        base: dict[str, Any] = {}
    elif not isinstance(parent_spec, str):
        raise RecipeError(f"{path}: extends: must be a recipe name or path, got {parent_spec!r}")
    else:
        base = _load_raw(_locate(parent_spec, path.parent), (*chain, path.resolve()), origins)
    for key in _leaves(data):
        origins[key] = str(path)
    return _merge(base, data)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: take it as a string


def parse_assignment(assignment: str) -> tuple[str, Any]:
    """``"optim.lr=0.06"`` -> ``("optim.lr", 0.06)``; the value is read as TOML, or else as a plain string."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, e.g. optim.lr=0.06")
    return key, _parse_value(text.strip())


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set one dotted key in place; list items by index (``views.0.size``) or all of them (``views.*.size``)."""
    parts = key.split(".")
    targets: list[Any] = [data]
    for i, part in enumerate(parts[:-1]):
        nxt: list[Any] = []
        for node in targets:
            if isinstance(node, list):
                if part == "*":
                    nxt.extend(node)
                elif part.isdigit() and int(part) < len(node):
                    nxt.append(node[int(part)])
                else:
                    raise RecipeError(
                        f"--set {key}: '{'.'.join(parts[: i + 1])}' must be an index below {len(node)} or '*'"
                    )
            else:
                nxt.append(node.setdefault(part, {}))
                if not isinstance(nxt[-1], dict | list):
                    raise RecipeError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is not a table")
        targets = nxt
    for node in targets:
        if isinstance(node, list):
            raise RecipeError(f"--set {key}: '{'.'.join(parts[:-1])}' is a list; name an index or '*'")
        node[parts[-1]] = copy.deepcopy(value)


def _model_at(model: type[BaseModel], path: tuple) -> type[BaseModel] | None:
    """The section model that holds the keys at ``path`` (list indices skipped), or None."""
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        candidates = [field.annotation, *get_args(field.annotation)]
        candidates += [arg for c in candidates for arg in get_args(c)]
        found = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if found is None:
            return None
        model = found
    return model


def _error(err: ValidationError, model: type[BaseModel], origins: dict[str, str], prefix: tuple = ()) -> RecipeError:
    """One line for the first validation error: where it came from, the dotted key, what is valid."""
    e = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in (*prefix, *e["loc"]))
    given = [origins[k] for k in origins if k.startswith(loc + ".") and origins[k].startswith(("--set", "command"))]
    source = (
        origins.get(loc)
        or next(iter(given), None)  # a table whose key came from the command line (--set backbone.kwargs.x=...)
        or next((origins[k] for k in sorted(origins, key=len, reverse=True) if loc.startswith(k + ".")), "recipe")
    )
    if e["type"] == "extra_forbidden":
        parent = _model_at(model, tuple(e["loc"][:-1]))
        valid = f"; valid: {', '.join(parent.model_fields)}" if parent is not None else ""
        return RecipeError(f"{source}: unknown key '{loc}'{valid}")
    if e["type"] == "missing":
        return RecipeError(f"{source}: missing key '{loc}'")
    msg = e["msg"].removeprefix("Value error, ")
    return RecipeError(f"{source}: {loc}: {msg} (got {e['input']!r})" if loc else f"{source}: {msg}")


_NOTED: set[tuple[str, str]] = set()

# Old recipe keys (dotted) -> their new names. A method's own old ``[method]`` keys are in its ``Config.renamed``.
RENAMED: dict[str, str] = {
    "monitor.knn_every": "monitor.knn.every",
    "monitor.knn_k": "monitor.knn.k",
    "monitor.knn_temperature": "monitor.knn.temperature",
}


def _table(data: dict[str, Any], parts: list[str], create: bool = False) -> dict[str, Any] | None:
    """The table at ``parts`` inside ``data`` (created on the way with ``create``), or None."""
    node: Any = data
    for part in parts:
        if not isinstance(node, dict):
            return None
        if part not in node and create:
            node[part] = {}
        node = node.get(part)
    return node if isinstance(node, dict) else None


def _rename_old_keys(data: dict[str, Any], renamed: dict[str, str], origins: dict[str, str]) -> None:
    """Old names of recipe keys (``renamed``: old -> new, dotted) load as the new ones, with a one-line note on
    stderr (once per key and file), so that saved runs, their checkpoints and user recipes still load and resume."""
    for old, new in renamed.items():
        *old_path, old_key = old.split(".")
        *new_path, new_key = new.split(".")
        parent = _table(data, old_path)
        if parent is None or old_key not in parent:
            continue
        source, new_source = origins.get(old, "recipe"), origins.get(new, "recipe")
        target = _table(data, new_path, create=True)
        if target is None:
            raise RecipeError(f"{source}: {old} is the old name of {new}, but {'.'.join(new_path)} is not a table")
        if new_key in target and source == new_source:
            raise RecipeError(f"{source}: {old} is the old name of {new}; give only {new}")
        value = parent.pop(old_key)
        # both given: the command line wins; otherwise the old name, which only a user's file or an old run has (a
        # recipe extending a built-in one, whose own keys have the new name)
        if new_key not in target or not new_source.startswith(("--set", "command line")):
            target[new_key] = value
        if (source, old) not in _NOTED:
            _NOTED.add((source, old))
            print(f"note: {source}: {old} is now {new} (the old name still loads)", file=sys.stderr)


def resolve(data: dict[str, Any], origins: dict[str, str] | None = None) -> Recipe:
    """Validate a raw recipe dict into a ``Recipe``; the method section by its method's own schema."""
    # The one import from a lower layer up: each method owns its ``[method]`` schema in its own file (one file per
    # method), so validating that section has to ask the registry. Lazy, so that importing ``config`` stays cheap
    # and the methods, which import ``config.schema``, are not part of an import circle.
    from ssl_cli.methods.registry import get_method

    origins = origins or {}
    data = copy.deepcopy(data)
    data.pop("extends", None)
    method = data.get("method")
    if not isinstance(method, dict):
        raise RecipeError(f"{origins.get('method', 'recipe')}: missing table [method] with a 'name'")
    try:
        config_cls = get_method(method.get("name")).Config
    except RecipeError as e:
        raise RecipeError(f"{origins.get('method.name', 'recipe')}: method.name: {e}") from None
    renamed = {f"method.{old}": f"method.{new}" for old, new in getattr(config_cls, "renamed", {}).items()}
    _rename_old_keys(data, {**RENAMED, **renamed}, origins)
    method = data["method"]
    try:
        data["method"] = config_cls.model_validate(method)
    except ValidationError as e:
        raise _error(e, config_cls, origins, ("method",)) from None
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise _error(e, Recipe, origins) from None


def load_recipe(recipe: str, overrides: Iterable[str | tuple[str, Any]] = ()) -> Recipe:
    """Load a built-in recipe by name or a TOML file by path, apply overrides in order and validate.

    Overrides are ``"a.b=value"`` strings (``--set``) or ``(key, value)`` pairs (typed command-line flags).
    """
    path = _locate(recipe)
    origins: dict[str, str] = {}
    data = _load_raw(path, (), origins)
    _apply_overrides(data, overrides, origins)
    info = data.setdefault("recipe", {})
    if isinstance(info, dict) and not info.get("name"):
        info["name"] = path.stem
    return resolve(data, origins)


def _apply_overrides(data: dict[str, Any], overrides: Iterable[str | tuple[str, Any]], origins: dict[str, str]) -> None:
    for override in overrides:
        key, value = parse_assignment(override) if isinstance(override, str) else override
        apply_override(data, key, value)
        origins[key] = f"--set {key}" if isinstance(override, str) else "command line"


def recipe_from_dict(
    data: dict[str, Any], source: str = "checkpoint", overrides: Iterable[str | tuple[str, Any]] = ()
) -> Recipe:
    """Validate a recipe stored as a dict (e.g. in checkpoint metadata), after ``overrides`` as in ``load_recipe``."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: the recipe is not a table (got {type(data).__name__})")
    data = copy.deepcopy(data)
    origins = {k: source for k in _leaves(data)}
    _apply_overrides(data, overrides, origins)
    return resolve(data, origins)
