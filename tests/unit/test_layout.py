"""The shape of the package: one installable `octoflux`, a core that speaks no dialect, a README that
lists every module."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "octoflux"
# Folders that must never import an API dialect (`octoflux.api.*`).
DIALECT_FREE = ("core", "state", "webhooks", "assets", "pipelines")


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def layout_table() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1]
    return section.split("\n## ", 1)[0]


def test_the_readme_layout_lists_every_module_and_nothing_that_is_gone():
    listed = set(re.findall(r"`((?:octoflux|benchmarks|tests)/[\w/.-]+)`", layout_table()))
    missing = [str(p.relative_to(ROOT)) for p in modules() if str(p.relative_to(ROOT)) not in listed]
    gone = sorted(path for path in listed if not (ROOT / path).exists())
    assert not missing, f"modules the README's layout table does not list: {missing}"
    assert not gone, f"paths in the README's layout table that do not exist: {gone}"


@pytest.mark.parametrize("folder", DIALECT_FREE)
def test_the_core_never_imports_an_api_dialect(folder):
    offenders = {
        str(path.relative_to(ROOT)): sorted(n for n in imported(path) if n.startswith("octoflux.api"))
        for path in (PACKAGE / folder).rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_pipelines_import_nothing_of_the_server():
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            n for n in imported(path) if n.startswith("octoflux.") and not n.startswith("octoflux.pipelines")
        )
        for path in (PACKAGE / "pipelines").rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_only_octoflux_is_installed_not_server_or_pipelines(tmp_path):
    """Run outside the checkout, so only the installed package can be found."""
    probe = (
        "import importlib.util, octoflux.cli\n"
        "print([n for n in ('server', 'pipelines', 'benchmarks') if importlib.util.find_spec(n)])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
