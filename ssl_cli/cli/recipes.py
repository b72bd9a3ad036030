"""``ssl recipes list|show``: the built-in recipes."""

from __future__ import annotations

import sys

import tomli_w
import typer
from rich.table import Table

from ssl_cli.cli.console import emit_json, handles_errors, stdout
from ssl_cli.config import builtin_recipes, load_recipe

app = typer.Typer(help="List and show the built-in recipes.", no_args_is_help=True)


@app.command("list")
@handles_errors
def list_recipes(as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout.")) -> None:
    """List the built-in recipes with their method and a one-line description."""
    rows = []
    for name in builtin_recipes():
        r = load_recipe(name)
        rows.append(
            {
                "name": name,
                "method": r.method.name,
                "backbone": r.backbone.name,
                "description": r.recipe.description,
            }
        )
    if as_json:
        emit_json({"recipes": rows})
        return
    table = Table("recipe", "method", "backbone", "description")
    for row in rows:
        table.add_row(row["name"], row["method"], row["backbone"], row["description"])
    stdout.print(table)


@app.command("show")
@handles_errors
def show(
    recipe: str = typer.Argument(..., help="Built-in recipe name or path to a .toml file."),
    overrides: list[str] = typer.Option([], "--set", help="Override a key, e.g. --set optim.lr=0.06."),
) -> None:
    """Print the fully resolved recipe as TOML (save it, edit it, pass it back with --recipe FILE)."""
    r = load_recipe(recipe, overrides)
    sys.stdout.write(f"# resolved from {recipe}\n" + tomli_w.dumps(r.to_dict()))
