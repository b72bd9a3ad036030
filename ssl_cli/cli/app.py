"""The ``ssl`` command-line app: one thin module per command, bodies call library functions."""

from __future__ import annotations

import sys

import typer

import ssl_cli
from ssl_cli.cli import bench, embed, evaluate, export, inspect, neighbors, plot, pretrain, recipes, transfer, visualize
from ssl_cli.cli.console import err

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
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """ssl: SimCLR, MoCo and friends on timm backbones, from the command line."""


app.command("pretrain")(pretrain.pretrain)
app.command("knn")(evaluate.knn)
app.command("linear-probe")(evaluate.linear_probe)
app.command("probe", help="Alias of linear-probe.")(evaluate.linear_probe)
app.command("export")(export.export)
app.command("inspect")(inspect.inspect)
app.command("embed")(embed.embed)
app.command("transfer")(transfer.transfer)
app.command("bench")(bench.bench)
app.command("visualize")(visualize.visualize)
app.add_typer(recipes.app, name="recipes")
app.add_typer(plot.app, name="plot")
app.command("neighbors")(neighbors.neighbors)


def main() -> None:
    """Console-script entry point: usage errors are one line too, like every other error."""
    try:
        code = app(prog_name="ssl", standalone_mode=False)
    except typer.Abort:
        err.print("error: interrupted", markup=False)
        sys.exit(130)
    except Exception as e:
        # click's usage errors (typer may vendor its own click, so match by shape, not by class)
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `ssl`: the help text is the message
            err.print(e.format_message(), markup=False, highlight=False)
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        err.print(f"error: {e.format_message()}{hint}", markup=False, highlight=False)
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
