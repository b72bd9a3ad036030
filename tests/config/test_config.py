"""Recipes: strict validation with one-line errors, extends, --set overrides, round trips."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import tomli_w

import ssl_cli.config.load as config_load
from ssl_cli.config import builtin_recipes, load_recipe, recipe_from_dict
from ssl_cli.config.load import parse_assignment
from ssl_cli.errors import RecipeError


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
        ("optim.name=adam", r"optim.name: Input should be 'sgd', 'lars' or 'adamw'"),
        ("method.temperatur=0.1", r"unknown key 'method.temperatur'; valid: name, .*temperature"),
        ("method.name=nope", r"method.name: unknown method 'nope'; valid: barlowtwins, byol, .*, simsiam"),
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
