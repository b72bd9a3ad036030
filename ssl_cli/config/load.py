"""Load a recipe: built-in name or TOML path, ``extends`` chains, ``--set a.b=value`` overrides, validation.

Errors come out as one line naming the file (or ``--set``), the dotted key, what was wrong and what is valid.
"""

from __future__ import annotations

import copy
import functools
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ValidationError

from ssl_cli.config.schema import Recipe
from ssl_cli.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


F = TypeVar("F", bound=Callable[..., Any])


def _printable(text: str) -> str:
    """``text`` with control characters (a newline or tab in a key, a NUL) escaped as Python writes them."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def one_line_errors(fn: F) -> F:
    """A ``RecipeError`` out of ``fn`` is one printable line, whatever characters the keys and values it names hold."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RecipeError as e:
            if str(e).isprintable():
                raise
            raise RecipeError(_printable(str(e))) from None

    return wrapper  # type: ignore[return-value]


def recipes_dir() -> Path:
    """Folder of the built-in recipes: ``ssl_cli/recipes`` in an installed wheel, top-level ``recipes/`` in a
    source checkout (editable installs included)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "recipes"
    return installed if installed.is_dir() else package.parent / "recipes"


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.toml"))


MAX_DEPTH = 16
"""Tables and arrays nest at most this deep in a recipe (the schema needs 3); deeper is an error, not a crash."""


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def _locate(spec: str, relative_to: Path | None = None) -> Path:
    path = Path(spec)
    try:
        path = path.expanduser()
    except RuntimeError:  # ~user of no such user: no home to expand to
        raise RecipeError(f"recipe file not found: {spec} (no home folder for {spec.split('/')[0]})") from None
    if spec.endswith(".toml") or path.suffix or "/" in spec:
        if not path.is_absolute() and relative_to is not None and not _is_file(path):
            path = relative_to / path
        if not _is_file(path):
            raise RecipeError(f"recipe file not found: {path}")
        return path
    builtin = recipes_dir() / f"{spec}.toml"
    if not _is_file(builtin):
        raise RecipeError(f"unknown recipe {spec!r}; valid: {', '.join(builtin_recipes())} (or a path to a .toml file)")
    return builtin


def _too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether tables / arrays nest deeper than ``limit`` (iterative: a deep value cannot overflow the stack here)."""
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth >= limit:
                return True
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: invalid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read recipe: {e}") from None
    except (ValueError, RecursionError) as e:  # an integer of over 4,300 digits; arrays nested thousands deep
        raise RecipeError(f"{path}: invalid TOML: {_reason(e)}") from None
    if _too_deep(data):
        raise RecipeError(f"{path}: tables or arrays nested deeper than {MAX_DEPTH} levels; a recipe needs 3")
    return data


def _reason(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "values nested too deeply"
    return str(e).split(";")[0]  # "Exceeds the limit (4300 digits) for integer string conversion"


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
        raise RecipeError(f"{path}: extends: must be a recipe name or path, got {_shown(parent_spec)}")
    else:
        try:
            parent = _locate(parent_spec, path.parent)
        except RecipeError as e:  # the file that names the missing one, and the files that led to it
            names = " -> ".join(str(p) for p in (*chain, path))
            raise RecipeError(f"{names}: extends = {parent_spec!r}: {e}") from None
        base = _load_raw(parent, (*chain, path.resolve()), origins)
    for key in _leaves(data):
        origins.pop(key, None)  # re-inserted: the order of ``origins`` is the order of assignment
        origins[key] = str(path)
    return _merge(base, data)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: take it as a string


@one_line_errors
def parse_assignment(assignment: str) -> tuple[str, Any]:
    """``"optim.lr=0.06"`` -> ``("optim.lr", 0.06)``; the value is read as TOML, or else as a plain string."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, e.g. optim.lr=0.06")
    try:
        assignment.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 on the command line (decoded as lone surrogates)
        raise RecipeError(f"--set {assignment!r}: not UTF-8 text; recipes are UTF-8") from None
    try:
        value = _parse_value(text.strip())
    except (ValueError, RecursionError) as e:  # an integer of over 4,300 digits; arrays nested thousands deep
        raise RecipeError(f"--set {key}: cannot read the value: {_reason(e)}") from None
    if _too_deep(value, MAX_DEPTH - 2):
        raise RecipeError(f"--set {key}: the value nests tables or arrays deeper than {MAX_DEPTH - 2} levels")
    return key, value


def _index(node: list, part: str, key: str, where: str) -> list[int]:
    """The items of the list ``node`` (at ``where``) that the key segment ``part`` names: ``*`` or an index."""
    if part == "*":
        return list(range(len(node)))
    if part.isascii() and part.isdigit() and int(part) < len(node):
        return [int(part)]
    raise RecipeError(f"--set {key}: '{where}.{part}': {where} is a list; name an index below {len(node)} or '*'")


def _children(node: Any, part: str, key: str, where: str) -> list[Any]:
    """What the dotted key segment ``part`` names inside ``node`` (the table or list at ``where``); tables on the
    way are created."""
    if isinstance(node, list):
        return [node[i] for i in _index(node, part, key, where)]
    if not isinstance(node, dict):
        raise RecipeError(f"--set {key}: '{where}' is not a table (it holds {_shown(node)})")
    if part == "*":
        table = f"'{where}' is a table, not a list" if where else "the recipe is a table"
        raise RecipeError(f"--set {key}: {table}; '*' stands for every item of a list")
    return [node.setdefault(part, {})]


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set one dotted key in place; list items by index (``views.0.size``, ``data.mean.0``) or all of them
    (``views.*.size``)."""
    parts = key.split(".")
    if any(not part.strip() for part in parts):
        raise RecipeError(f"--set {key}: an empty name between dots; write the key as section.name, e.g. optim.lr")
    targets: list[Any] = [data]
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[:i])
        targets = [child for node in targets for child in _children(node, part, key, where)]
    where, last = ".".join(parts[:-1]), parts[-1]
    for node in targets:
        if isinstance(node, list):
            for i in _index(node, last, key, where):
                node[i] = copy.deepcopy(value)
        elif isinstance(node, dict) and last != "*":
            node[last] = copy.deepcopy(value)
        else:
            _children(node, last, key, where)  # the error: not a table, or '*' on a table


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error line stays readable whatever the input."""
    try:
        text = repr(value)
    except ValueError:  # an integer beyond Python's 4,300-digit conversion limit
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= limit else f"{text[: limit - 5]} ...{text[-1] if text[-1] in ')]}' else ''}"


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


# the names pydantic gives the members of a union in an error's location (``int | Literal["auto"]``): not keys
_UNION_MEMBER = re.compile(r"^(constrained-)?(int|float|str|bool|list|dict)$|^(literal|function-\w+|list|dict)\[")


def _key_loc(loc: tuple) -> tuple:
    """An error's location without the union member names pydantic appends."""
    while loc and isinstance(loc[-1], str) and _UNION_MEMBER.match(loc[-1]):
        loc = loc[:-1]
    return loc


def _message(errors: list[dict[str, Any]], loc: tuple) -> str:
    """What is wrong at ``loc``: the first error's message, or for a union every member's (``a valid integer or
    'auto'``)."""
    msgs = [e["msg"].removeprefix("Value error, ") for e in errors if _key_loc(tuple(e["loc"])) == loc]
    prefix = "Input should be "
    if len(msgs) > 1 and all(m.startswith(prefix) for m in msgs):
        return prefix + " or ".join(dict.fromkeys(m.removeprefix(prefix) for m in msgs))
    return msgs[0]


def _covers(key: str, loc: str) -> int | None:
    """How many leading names of the dotted ``loc`` the origin ``key`` names (``*`` matches any list index): all of
    them, a part (``key`` is a table above ``loc``), or None (``key`` is elsewhere, or below ``loc``: negative)."""
    names, at = key.split("."), loc.split(".")
    if not all(a == b or a == "*" for a, b in zip(names, at, strict=False)):
        return None
    return len(names) if len(names) <= len(at) else len(at) - len(names)


def _source(loc: str, origins: dict[str, str]) -> str:
    """Where the value at ``loc`` came from: the file, ``--set KEY`` (``views.*.size`` for ``views.0.size``) or the
    command line; the last assignment of a key wins, as it does in the recipe."""
    hits = [(n, origins[k]) for k in origins if k and (n := _covers(k, loc)) is not None]
    full = len(loc.split("."))
    exact = [src for n, src in hits if n == full]
    # a table whose key came from the command line (--set backbone.kwargs.x=...)
    given = [src for n, src in hits if n < 0 and src.startswith(("--set", "command"))]
    above = sorted((n, i, src) for i, (n, src) in enumerate(hits) if 0 < n < full)
    return (exact or given or [src for _, _, src in above] or [origins.get("", "recipe")])[-1]


def _error(err: ValidationError, model: type[BaseModel], origins: dict[str, str], prefix: tuple = ()) -> RecipeError:
    """One line for the first validation error: where it came from, the dotted key, what is valid."""
    errors = err.errors(include_url=False)
    e = errors[0]
    key_loc = _key_loc(tuple(e["loc"]))
    loc = ".".join(str(p) for p in (*prefix, *key_loc))
    source = _source(loc, origins)
    if e["type"] == "extra_forbidden":
        parent = _model_at(model, tuple(e["loc"][:-1]))
        valid = f"; valid: {', '.join(parent.model_fields)}" if parent is not None else ""
        return RecipeError(f"{source}: unknown key '{loc}'{valid}")
    if e["type"] == "missing":
        return RecipeError(f"{source}: missing key '{loc}'")
    msg = _message(errors, key_loc)
    return RecipeError(f"{source}: {loc}: {msg} (got {_shown(e['input'])})" if loc else f"{source}: {msg}")


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


@one_line_errors
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
        raise RecipeError(f"{origins.get('method') or origins.get('', 'recipe')}: missing table [method] with a 'name'")
    try:
        config_cls = get_method(method.get("name")).Config
    except RecipeError as e:
        source = origins.get("method.name") or origins.get("method") or origins.get("", "recipe")
        raise RecipeError(f"{source}: method.name: {e}") from None
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


@one_line_errors
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
        depth = len(key.split("."))
        for replaced in [k for k in origins if _covers(key, k) == depth]:  # the key and what was below it
            del origins[replaced]  # (the order of ``origins`` is the order of assignment)
        origins[key] = f"--set {key}" if isinstance(override, str) else "command line"


@one_line_errors
def recipe_from_dict(
    data: dict[str, Any], source: str = "checkpoint", overrides: Iterable[str | tuple[str, Any]] = ()
) -> Recipe:
    """Validate a recipe stored as a dict (e.g. in checkpoint metadata), after ``overrides`` as in ``load_recipe``."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: the recipe is not a table (got {type(data).__name__})")
    if _too_deep(data):
        raise RecipeError(f"{source}: tables or arrays nested deeper than {MAX_DEPTH} levels; a recipe needs 3")
    data = copy.deepcopy(data)
    origins = {k: source for k in _leaves(data)}
    _apply_overrides(data, overrides, origins)
    return resolve(data, origins)
