"""Helpers shared by the test files: the ``ssl`` app run in-process, and what its output must look like."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import Result
from typer.testing import CliRunner

from conftest import TINY
from ssl_cli.cli.app import app

# TINY as --set arguments (epochs as the --epochs flag: --set would win over it), plus a small projector
TINY_SET = [a for k, v in TINY if k != "train.epochs" for a in ("--set", f"{k}={v}")]
TINY_SET += ["--set", "method.proj_hidden_dim=64", "--set", "method.proj_output_dim=32"]
EVAL = ["--device", "cpu", "--num-workers", "0"]


def _runner() -> CliRunner:
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2: stdout and stderr are always kept apart
        return CliRunner()


def invoke(*args: str | Path, columns: int = 80) -> Result:
    """The ``ssl`` app on ``args``, stdout and stderr apart."""
    return _runner().invoke(app, [str(a) for a in args], env={"SSL_DEBUG": None, "COLUMNS": str(columns)})


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.stdout + result.stderr
    return result


def one_json(result: Result) -> dict:
    """stdout holds exactly one JSON object on one line, nothing else."""
    ok(result)
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1, result.stdout
    payload = json.loads(result.stdout)
    assert isinstance(payload, dict)
    return payload


def user_error(result: Result, *fragments: str, code: int = 2, only_line: bool = True) -> str:
    """A user error: exit ``code``, nothing on stdout, one ``error:`` line on stderr, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    if only_line:
        assert lines == errors, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]
