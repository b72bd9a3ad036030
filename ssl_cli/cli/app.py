"""The ``ssl`` command-line app: one thin module per command, bodies call library functions."""

from __future__ import annotations

import typer

import ssl_cli
from ssl_cli.cli import evaluate, export, pretrain, recipes, transfer

app = typer.Typer(
    name="ssl",
    help="Self-supervised visual representation learning: pretrain, evaluate and export timm backbones.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ssl {ssl_cli.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version."
    ),
) -> None:
    """ssl: SimCLR, MoCo and friends on timm backbones, from the command line."""


app.command("pretrain")(pretrain.pretrain)
app.command("knn")(evaluate.knn)
app.command("linear-probe")(evaluate.linear_probe)
app.command("probe", help="Alias of linear-probe.")(evaluate.linear_probe)
app.command("export")(export.export)
app.command("transfer")(transfer.transfer)
app.add_typer(recipes.app, name="recipes")


def main() -> None:
    app(prog_name="ssl")
