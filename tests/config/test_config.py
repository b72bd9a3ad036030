"""Recipes: strict validation with one-line errors, extends, --set overrides, round trips."""

from __future__ import annotations

import copy
import datetime as dt
import re
import tempfile
from pathlib import Path

import pydantic
import pytest
import tomli_w
from helpers import invoke, user_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ssl_cli.config.load as config_load
from conftest import assert_one_line_error
from ssl_cli.config import builtin_recipes, load_recipe, recipe_from_dict
from ssl_cli.config.load import _model_at, parse_assignment
from ssl_cli.config.schema import Recipe
from ssl_cli.errors import RecipeError
from ssl_cli.methods.registry import METHODS, get_method


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_builtin_recipes_load_and_follow_papers() -> None:
    assert {"simclr", "simclr-cifar", "mocov2", "mocov2-cifar"} <= set(builtin_recipes())
    simclr = load_recipe("simclr")
    assert (simclr.method.temperature, simclr.optim.name, simclr.train.batch_size) == (0.1, "lars", 4096)
    assert simclr.views[0].count == 2 and simclr.views[0].scale == [0.08, 1.0] and simclr.views[0].blur_prob == 0.5
    moco = load_recipe("mocov2")
    assert (moco.method.queue_size, moco.method.momentum, moco.method.temperature) == (65536, 0.999, 0.2)
    assert (moco.optim.name, moco.optim.lr, moco.train.batch_size, moco.train.epochs) == ("sgd", 0.03, 256, 200)
    assert moco.views[0].jitter_strength == 0.5  # 0.4 / 0.4 / 0.4 / 0.1
    for name in ("simclr-cifar", "mocov2-cifar"):
        r = load_recipe(name)
        assert r.views[0].size == 32 and r.backbone.small_stem and r.views[0].blur_prob == 0.0


def test_extends_merges_tables_and_replaces_lists() -> None:
    base, child = load_recipe("mocov2"), load_recipe("mocov2-cifar")
    assert child.method.shuffle_bn_splits == base.method.shuffle_bn_splits  # inherited
    assert child.method.queue_size == 4096  # overridden
    assert len(child.views) == 1 and child.views[0].size == 32
    assert child.recipe.name == "mocov2-cifar"


def test_user_file_extends_builtin(tmp_path: Path) -> None:
    path = write(tmp_path / "mine.toml", 'extends = "simclr"\n[optim]\nlr = 0.5\n')
    r = load_recipe(str(path))
    assert r.optim.lr == 0.5 and r.method.name == "simclr" and r.recipe.name == "mine"


def test_extends_cycle_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(str(tmp_path / "a.toml"))


def test_set_overrides_parse_toml_values() -> None:
    assert parse_assignment("optim.lr=0.06") == ("optim.lr", 0.06)
    assert parse_assignment("backbone.small_stem=true") == ("backbone.small_stem", True)
    assert parse_assignment("backbone.name=resnet50") == ("backbone.name", "resnet50")
    assert parse_assignment("data.mean=[0.5, 0.5, 0.5]") == ("data.mean", [0.5, 0.5, 0.5])
    r = load_recipe("simclr", ["optim.lr=0.06", "views.*.size=64", "train.epochs=3"])
    assert (r.optim.lr, r.views[0].size, r.train.epochs) == (0.06, 64, 3)
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        load_recipe("simclr", ["optim.lr"])
    with pytest.raises(RecipeError, match="index below 1"):
        load_recipe("simclr", ["views.3.size=32"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("optim.lrr=1", r"--set optim.lrr: unknown key 'optim.lrr'; valid: name, lr, "),
        ("views.0.sise=32", r"unknown key 'views.0.sise'; valid: count, size, scale"),
        ("optim.lr=abc", r"optim.lr: Input should be a valid number .*'abc'"),
        ("optim.lr=-1", r"optim.lr: Input should be greater than 0"),
        ("train.epochs=0", r"train.epochs: Input should be greater than or equal to 1"),
        ("train.epochs=1.5", r"train.epochs: Input should be a valid integer"),
        ("optim.name=adagrad", r"optim.name: Input should be 'sgd', 'lars', 'adamw' or 'adam'"),
        ("method.temperatur=0.1", r"unknown key 'method.temperatur'; valid: name, .*temperature"),
        ("method.name=nope", r"method.name: unknown method 'nope'; valid: amdim, barlowtwins, byol, .*, simsiam"),
        ("views.0.scale=[0.5, 0.1]", r"views.0.scale: must be \[low, high\]"),
        ("train.device=tpu", r"train.device: must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("backbone.small_stem=1", r"backbone.small_stem: Input should be a valid boolean"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(override: str, pattern: str) -> None:
    with pytest.raises(RecipeError, match=pattern) as info:
        load_recipe("simclr", [override])
    assert "\n" not in str(info.value)


def test_errors_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.toml", 'extends = "simclr"\n[train]\nepochs = "ten"\n')
    with pytest.raises(RecipeError, match=rf"{path}: train.epochs: Input should be a valid integer"):
        load_recipe(str(path))
    path = write(tmp_path / "typo.toml", 'extends = "simclr"\n[trian]\nepochs = 1\n')
    with pytest.raises(RecipeError, match=rf"{path}: unknown key 'trian'; valid: recipe, method, backbone"):
        load_recipe(str(path))
    path = write(tmp_path / "broken.toml", "[train\n")
    with pytest.raises(RecipeError, match=rf"{path}: invalid TOML"):
        load_recipe(str(path))
    with pytest.raises(RecipeError, match=r"unknown recipe 'nope'; valid: .*mocov2.*simclr"):
        load_recipe("nope")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(str(tmp_path / "missing.toml"))
    path = write(tmp_path / "nomethod.toml", "[train]\nepochs = 1\n")
    with pytest.raises(RecipeError, match=r"missing table \[method\]"):
        load_recipe(str(path))


def test_resolved_recipe_round_trips_through_toml(tmp_path: Path) -> None:
    for name in builtin_recipes():
        r = load_recipe(name, ["optim.lr=0.123"])
        path = write(tmp_path / f"{name}.toml", tomli_w.dumps(r.to_dict()))
        again = load_recipe(str(path))
        assert again == r


def test_recipes_are_immutable() -> None:
    r = load_recipe("simclr")
    with pytest.raises(pydantic.ValidationError):
        r.optim.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("recipe", "old", "new"),
    [("byol", "tau_base", "momentum"), ("byol", "tau_final", "momentum_final"), ("mocov3", "momentum_base", "momentum")]
    + [("dino", "momentum_base", "momentum")],
)
def test_old_names_of_the_ema_rate_load_as_the_new_ones(recipe, old, new, tmp_path, capsys, monkeypatch) -> None:
    """One name for the EMA rate (momentum, momentum_final) in every method; the old ones still load, with a note."""
    monkeypatch.setattr(config_load, "_NOTED", set())  # the note is printed once per key and file in a process
    r = load_recipe(recipe, [(f"method.{old}", 0.999)])
    assert getattr(r.method, new) == 0.999 and old not in r.method.model_dump()
    assert f"method.{old} is now method.{new}" in capsys.readouterr().err
    # a saved recipe (a checkpoint's, a run folder's) with the old name is the same recipe: resume compares equal
    saved = r.to_dict()
    saved["method"][old] = saved["method"].pop(new)
    assert recipe_from_dict(saved).to_dict() == r.to_dict()
    # a user's recipe extending the built-in one (which has the new name) with the old one: the user's value wins
    user = tmp_path / "mine.toml"
    user.write_text(f'extends = "{recipe}"\n\n[method]\n{old} = 0.999\n', encoding="utf-8")
    assert getattr(load_recipe(str(user)).method, new) == 0.999


def test_byol_momentum_final_below_momentum_is_rejected() -> None:
    with pytest.raises(RecipeError, match="momentum_final"):
        load_recipe("byol", [("method.momentum_final", 0.9)])


def test_old_monitor_keys_load_as_the_knn_table(capsys, monkeypatch) -> None:
    """``monitor.knn_k`` / ``knn_temperature`` / ``knn_every`` are now ``monitor.knn.k`` / ... (the names of
    ``ssl knn --k / --temperature``); the old names still load, with a note, and both at once from one place is an
    error."""
    monkeypatch.setattr(config_load, "_NOTED", set())
    r = load_recipe("simclr", ["monitor.knn_k=7", "monitor.knn_temperature=0.2", "monitor.knn_every=3"])
    assert (r.monitor.knn.k, r.monitor.knn.temperature, r.monitor.knn.every) == (7, 0.2, 3)
    assert "monitor.knn_k is now monitor.knn.k" in capsys.readouterr().err
    assert "knn_k" not in r.to_dict()["monitor"]
    saved = r.to_dict()
    saved["monitor"] = {"knn_k": 7, "knn_temperature": 0.2, "knn_every": 3}
    assert recipe_from_dict(saved).to_dict() == r.to_dict()
    with pytest.raises(RecipeError, match="monitor.knn_k is the old name of monitor.knn.k; give only monitor.knn.k"):
        recipe_from_dict({**saved, "monitor": {"knn_k": 7, "knn": {"k": 7}}})


@pytest.mark.parametrize(
    ("assignment", "match"),
    [
        ("optim.lr=inf", "finite number"),
        ("optim.lr=1e999", "finite number"),
        ("schedule.min_lr=nan", "finite number"),
        ("train.seed=18446744073709551616", "less than 9223372036854775808"),
        ("train.seed=-1", "greater than or equal to 0"),
    ],
)
def test_non_finite_numbers_and_seeds_beyond_64_bits_are_one_line_errors(assignment: str, match: str) -> None:
    with pytest.raises(RecipeError, match=match) as info:
        load_recipe("simclr", [assignment])
    assert str(info.value).startswith(f"--set {assignment.split('=')[0]}") and "\n" not in str(info.value)


@pytest.mark.parametrize("recipe", ["swav", "deepclusterv2", "dino-resnet"])
def test_num_targets_beyond_the_views_is_one_line_error(recipe: str) -> None:
    from ssl_cli.train.pretrain import build_method

    r = load_recipe(
        recipe, [("backbone.name", "test_resnet"), ("backbone.small_stem", False), ("method.num_targets", 99)]
    )
    with pytest.raises(RecipeError, match=r"method.num_targets: 99 .* give only \d+; valid: 1 to \d+"):
        build_method(r)


def test_a_missing_extends_target_names_the_file_that_extends_it_and_the_chain(tmp_path: Path) -> None:
    top = write(tmp_path / "top.toml", 'extends = "mid.toml"\n')
    mid = write(tmp_path / "mid.toml", 'extends = "gone.toml"\n')
    one = write(tmp_path / "one.toml", 'extends = "simclr-cifr"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(str(top))
    assert str(info.value).startswith(f"{top} -> {mid.resolve()}: extends = 'gone.toml': recipe file not found: ")
    assert str(info.value).endswith(str(tmp_path / "gone.toml"))  # where it was looked for: beside mid.toml
    with pytest.raises(RecipeError, match=rf"^{one}: extends = 'simclr-cifr': unknown recipe 'simclr-cifr'; valid: "):
        load_recipe(str(one))


@pytest.mark.parametrize("assignment", ["optim..lr=1", ".lr=1", "..=1", "optim.=1", "optim. .lr=1"])
def test_an_empty_key_segment_is_blamed_on_the_set_not_the_recipe_file(assignment: str, tmp_path: Path) -> None:
    """``.lr=1`` used to be blamed on the built-in recipe file (``simclr.toml: unknown key ''``)."""
    mine = write(tmp_path / "mine.toml", 'extends = "simclr"\n')
    for recipe in ("simclr", str(mine)):
        key = assignment.split("=")[0]
        assert_one_line_error(
            rf"^--set {re.escape(key)}: an empty name between dots", load_recipe, recipe, [assignment]
        )


def test_a_set_through_every_item_is_blamed_on_the_set() -> None:
    """``--set views.*.size=abc`` used to be blamed on the built-in recipe file, which has no such value."""
    assert_one_line_error(r"^--set views\.\*\.size: views\.0\.size: Input should be a valid integer", load_recipe,
                          "simclr", ["views.*.size=abc"])  # fmt: skip
    assert_one_line_error(r"^--set optim: optim\.lr: Input should be greater than 0", load_recipe, "simclr",
                          ["optim={lr=-1}"])  # fmt: skip
    assert_one_line_error(
        r"^command line: views\.0\.size", load_recipe, "simclr", ["views.0.size=x", ("views.*.size", "y")]
    )


@pytest.mark.parametrize(
    ("sets", "pattern"),
    [
        (["data.mean.*.x=1"], r"--set data.mean.\*.x: 'data.mean.\*' is not a table \(it holds 0.485\)"),
        (["views=[1]", "views.*.size=32"], r"--set views.\*.size: 'views.\*' is not a table \(it holds 1\)"),
        (["views=['a']", "views.*.*.x=1"], r"'views.\*' is not a table"),
        (["views.\u00b2.size=32"], r"views is a list; name an index below 1 or '\*'"),
        (["*.x=1"], r"the recipe is a table; '\*' stands for every item of a list"),
        (["optim.*.lr=1"], r"'optim' is a table, not a list"),
        (["train.seed=" + "9" * 5000], r"--set train.seed: cannot read the value: Exceeds the limit \(4300 digits\)"),
        (["recipe.name=" + "[" * 3000 + "]" * 3000], r"--set recipe.name: cannot read the value: values nested too"),
        (["recipe.name=" + "[" * 20 + "]" * 20], r"--set recipe.name: the value nests tables or arrays deeper than"),
        (["optim.l\nr=1"], r"^--set optim.l\\nr: unknown key 'optim.l\\nr'; valid: name, lr"),
        (["recipe.name=\udcff"], r"not UTF-8 text"),
    ],
)
def test_sets_that_used_to_crash_are_one_line_recipe_errors(sets: list[str], pattern: str) -> None:
    """Found by the property tests below (TypeError, AttributeError, ValueError, RecursionError before); a newline in
    a key is written escaped."""
    assert_one_line_error(pattern, load_recipe, "simclr", sets)


def test_sets_of_list_items_by_index_or_all() -> None:
    assert load_recipe("simclr", ["data.mean.*=0.5"]).data.mean == [0.5, 0.5, 0.5]
    assert load_recipe("simclr", ["data.mean.1=0.5"]).data.mean == [0.485, 0.5, 0.406]
    assert load_recipe("simclr", ["views.0={size=64}"]).views[0].size == 64


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('extends = "' + "x" * 300 + '.toml"\n', r"extends = 'x+\.toml': recipe file not found"),  # OSError before
        ('extends = "~nosuchuser/x.toml"\n', r"recipe file not found: ~nosuchuser/x.toml \(no home folder for"),
        ('extends = "a\\u0000.toml"\n', r"recipe file not found"),
        ("[train]\nseed = " + "9" * 5000 + "\n", r"invalid TOML: Exceeds the limit \(4300 digits\)"),  # ValueError
        ("x = " + "[" * 3000 + "]" * 3000 + "\n", r"invalid TOML: values nested too deeply"),  # RecursionError
        ('extends = "simclr"\n' + "a." * 2000 + "b = 1\n", r"nested deeper than 16 levels"),  # RecursionError
        ('extends = "simclr"\n["a\\nb"]\nc = 1\n', r"unknown key 'a\\nb'"),  # a newline in the message before
    ],
)
def test_recipe_files_that_used_to_crash_are_one_line_recipe_errors(text: str, pattern: str, tmp_path: Path) -> None:
    path = write(tmp_path / "r.toml", text)
    assert_one_line_error(rf"^{re.escape(str(path))}: .*{pattern}", load_recipe, str(path))


def test_a_checkpoint_recipe_without_a_method_is_blamed_on_the_checkpoint() -> None:
    """It said ``recipe: missing table [method]`` (no file named) before."""
    assert_one_line_error(r"^ckpt \(recipe\): missing table \[method\]", recipe_from_dict, {}, "ckpt (recipe)")
    assert_one_line_error(r"^ckpt \(recipe\): method.name: unknown method None", recipe_from_dict, {"method": {}},
                          "ckpt (recipe)")  # fmt: skip


def test_a_union_error_says_every_kind_of_valid_value_and_a_long_value_is_cut() -> None:
    """``data.num_workers.constrained-int: Input should be a valid integer`` before; a 10,000-character value was
    quoted whole."""
    assert_one_line_error(r"^--set data.num_workers: data.num_workers: Input should be a valid integer or 'auto' "
                          r"\(got 'x'\)$", load_recipe, "simclr", ["data.num_workers='x'"])  # fmt: skip
    with pytest.raises(RecipeError) as info:
        load_recipe("simclr", ["optim.lr='" + "x" * 10000 + "'"])
    assert len(str(info.value)) < 200 and str(info.value).endswith("xxxx ...)")


# --- property-based: any recipe file, extends chain or --set is a recipe or one RecipeError -------------------------


get_method("simclr")  # registers the built-in methods
BUILTINS = builtin_recipes()
SAMPLES = [load_recipe(name).to_dict() for name in BUILTINS]
# every key of the real schema, by section ([method]: the keys of every method), and the values the built-in recipes
# give them: documents mixing them with random keys and values reach the validators, not only "unknown key"
SECTION_KEYS: dict[str, list[str]] = {
    name: sorted({k for cls in METHODS.values() for k in cls.Config.model_fields})
    if name == "method"
    else list(_model_at(Recipe, (name,)).model_fields)
    for name in Recipe.model_fields
}
KNOWN: dict[str, list] = {}
for _sample in SAMPLES:
    for _section, _table in _sample.items():
        for _key, _value in (_table[0] if isinstance(_table, list) else _table).items():
            KNOWN.setdefault(f"{_section}.*.{_key}" if isinstance(_table, list) else f"{_section}.{_key}", []).append(
                _value
            )
DOTTED = sorted(KNOWN) + ["views.0.size", "views.0.scale", "views.9.size", "monitor.knn.k", "monitor.knn_k"]
KEYS = st.one_of(st.text(max_size=8), st.sampled_from(["", ".", "*", "0", "a.b", "extends", "name", "é", "\t"]))


def _mostly(common, rare, every: int = 8):
    """``common``, and one time in ``every`` ``rare``."""
    return st.integers(0, every - 1).flatmap(lambda i: rare if i == every // 2 else common)


ZONES = [None, dt.timezone.utc, dt.timezone(dt.timedelta(hours=-5, minutes=-30))]
SCALARS = st.one_of(
    st.text(max_size=12),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**80),
    st.integers(min_value=-(2**80), max_value=-(2**63) + 2),
    st.floats(),  # nan, inf, -0.0, subnormals
    st.booleans(),
    st.dates(),
    st.datetimes(timezones=st.sampled_from(ZONES)),
    st.times(),
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3), max_leaves=8
)


def _plausible(dotted: str):
    """A value the built-in recipes give this key, or anything."""
    known = KNOWN.get(re.sub(r"\.\d+\.", ".*.", dotted), [])
    return _mostly(st.sampled_from(known), VALUES, 4) if known else VALUES


@st.composite
def _table(draw, section: str) -> dict:
    keys = draw(st.lists(_mostly(st.sampled_from(SECTION_KEYS[section]), KEYS), max_size=5, unique=True))
    return {k: draw(_plausible(f"{section}.*.{k}" if section == "views" else f"{section}.{k}")) for k in keys}


@st.composite
def _document(draw) -> dict:
    doc = {}
    for name in draw(st.lists(_mostly(st.sampled_from(list(SECTION_KEYS)), KEYS), max_size=5, unique=True)):
        if name in SECTION_KEYS and draw(st.integers(0, 5)) != 3:
            views = name == "views" and draw(st.booleans())
            doc[name] = draw(st.lists(_table(name), max_size=3)) if views else draw(_table(name))
        else:
            doc[name] = draw(VALUES)
    return doc


def _inline(value) -> str:
    """``value`` as a TOML inline value (what a --set value looks like)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{tomli_w.dumps({k: 0})[:-5]} = {_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    return tomli_w.dumps({"v": value})[4:-1]


EXTENDS = _mostly(
    _mostly(st.sampled_from(BUILTINS), st.sampled_from(["r1.toml", "r2.toml", "./r2.toml"]), 3),
    st.one_of(
        st.sampled_from(["r0.toml", "r1", "missing.toml", "nosuch", "", "/", "sub/", "~nosuchuser/x.toml"]),
        st.sampled_from(["x" * 300 + ".toml", "../" * 3 + "r0.toml", "\0.toml"]),
        VALUES,
    ),
    4,
)


@st.composite
def recipe_files(draw) -> list[str]:
    """1-3 TOML files r0.toml, r1.toml, ... that may extend each other (cycles, missing targets) or built-ins."""
    texts = []
    for _ in range(draw(st.integers(1, 3))):
        doc = draw(_document())
        if draw(st.integers(0, 7)) != 4:
            doc = {"extends": draw(EXTENDS), **doc}
        text = tomli_w.dumps(doc)
        if draw(st.integers(0, 7)) == 4:  # now and then broken TOML: cut, or a random character put in
            cut = draw(st.integers(0, len(text)))
            text = text[:cut] + draw(st.text(max_size=3)) + text[cut + draw(st.integers(0, 3)) :]
        texts.append(text)
    return texts


SEGMENTS = sorted({part for key in DOTTED for part in key.split(".")})
SET_KEYS = _mostly(
    st.sampled_from(DOTTED),
    st.lists(st.sampled_from(SEGMENTS) | KEYS | st.integers(0, 3).map(str), min_size=1, max_size=4).map(".".join),
    3,
)
SET_VALUES = st.one_of(
    st.text(max_size=16),
    st.sampled_from(["1", "1e999", "-inf", "nan", "[1,", "{a=1}", "'x'", '"x', "a=b", "true", "1979-05-27", "0x10"]),
    VALUES.map(_inline),
)
ASSIGNMENTS = _mostly(st.builds(lambda k, v: f"{k}={v}", SET_KEYS, SET_VALUES), st.text(max_size=24))
PROPERTY = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _load(files: list[str], sets: list[str], folder: Path):
    """``load_recipe`` as ``ssl pretrain --recipe r0.toml --set ...`` calls it: the recipe or the RecipeError."""
    for i, text in enumerate(files):
        (folder / f"r{i}.toml").write_text(text, encoding="utf-8")
    try:
        return load_recipe(str(folder / "r0.toml"), sets)
    except RecipeError as e:
        message = str(e)
        assert message and "\n" not in message and "Traceback" not in message, message
        return e


def _check_valid(recipe) -> None:
    """A recipe that loads is saved (recipe.toml, checkpoint metadata) and reads back as the same recipe."""
    if isinstance(recipe, RecipeError):
        return
    assert recipe_from_dict(recipe.to_dict()) == recipe
    assert tomllib_loads(tomli_w.dumps(recipe.to_dict())) == recipe.to_dict()


def tomllib_loads(text: str) -> dict:
    return config_load.tomllib.loads(text)


@PROPERTY
@given(files=recipe_files(), sets=st.lists(ASSIGNMENTS, max_size=3))
def test_any_recipe_files_and_sets_give_a_recipe_or_one_recipe_error(files, sets, tmp_path: Path) -> None:
    _check_valid(_load(files, sets, Path(tempfile.mkdtemp(dir=tmp_path))))


@PROPERTY
@given(sets=st.lists(ASSIGNMENTS, min_size=1, max_size=4), recipe=st.sampled_from(BUILTINS))
def test_any_set_on_a_builtin_recipe_gives_a_recipe_or_one_recipe_error(sets, recipe) -> None:
    try:
        _check_valid(load_recipe(recipe, sets))
    except RecipeError as e:
        assert str(e) and "\n" not in str(e)


@PROPERTY
@given(data=_mostly(st.sampled_from(SAMPLES), VALUES), changes=st.lists(st.tuples(SET_KEYS, VALUES), max_size=4))
def test_any_checkpoint_recipe_gives_a_recipe_or_one_recipe_error(data, changes) -> None:
    """The recipe a checkpoint's metadata holds (a stranger's file): recipe_from_dict, what --resume calls."""
    data = copy.deepcopy(data)
    for key, value in changes:
        try:
            config_load.apply_override(data, key, value)
        except RecipeError:
            pass  # a change that cannot be made: the others still are
    try:
        _check_valid(recipe_from_dict(data, "ckpt (recipe)"))
    except RecipeError as e:
        assert str(e).startswith("ckpt (recipe)") and "\n" not in str(e), str(e)


@settings(PROPERTY, max_examples=12)
@given(files=recipe_files(), sets=st.lists(ASSIGNMENTS, max_size=2))
def test_through_the_cli_a_bad_recipe_is_one_line_and_exit_2(files, sets, tmp_path: Path) -> None:
    """``ssl pretrain --recipe FILE --set ...``: the library's RecipeError is the command's line, nothing written."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    loaded = _load(files, sets, folder)
    if not isinstance(loaded, RecipeError):
        return  # a valid recipe would train: the library call above checked it
    sets_args = [a for s in sets for a in ("--set", s)]
    out = folder / "run"
    result = invoke("pretrain", "--recipe", folder / "r0.toml", *sets_args, "--data", folder / "none", "--out", out)
    line = user_error(result)
    assert line.split()[:2] == f"error: {loaded}".split()[:2], (line, str(loaded))
    assert not out.exists()
