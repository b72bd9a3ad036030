"""The wheel ships the built-in recipes, so a non-editable install finds them."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_recipe_and_the_console_script(tmp_path: Path) -> None:
    try:
        import setuptools  # noqa: F401
    except ImportError:  # pragma: no cover
        pytest.skip("setuptools is needed to build the wheel offline")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
        str(ROOT),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("ssl_cli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("ssl_cli/recipes/") and n.endswith(".toml")}
    assert shipped == {p.name for p in (ROOT / "recipes").glob("*.toml")}
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ssl = ssl_cli.cli.app:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    # the unpacked wheel, imported ahead of this checkout, finds its recipes (what a plain `pip install .` gets)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        f"import sys; sys.path.insert(0, {str(site)!r}); import ssl_cli; "
        f"assert ssl_cli.__file__.startswith({str(site)!r}); "
        "from ssl_cli.config import builtin_recipes, load_recipe; print(','.join(builtin_recipes())); "
        "load_recipe('mocov2-cifar')"
    )
    found = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert found.stdout.strip().split(",") == sorted(p.stem for p in (ROOT / "recipes").glob("*.toml"))
    # every subpackage is listed in pyproject (an explicit list, because recipes/ is mapped into the package)
    packages = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "ssl_cli").rglob("__init__.py")}
    assert packages <= {str(Path(n).parent).replace("/", ".") for n in names if n.endswith("__init__.py")}
