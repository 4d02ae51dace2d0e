"""Every third-party module a test file (or the package, at import time) imports is declared.

CI installs only what ``pyproject.toml`` declares (``make test`` in a brand-new virtual
environment), but a machine where a package was installed by hand would hide a missing
declaration. This test reads the imports themselves, so it fails on any machine.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"csd_compile", "tests", "benchmarks", "conftest"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0])


def declared(extras: tuple[str, ...] = ("test",)) -> set[str]:
    """Normalised distribution names of the package's dependencies and the given extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return {_requirement_name(r) for r in reqs}


def imported_modules(source: str, *, top_level_only: bool = False) -> set[str]:
    """Top-level names of the absolute imports in ``source`` (every import, or only those run at
    module import time: not inside a function)."""
    tree = ast.parse(source)
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def undeclared(modules: set[str], allowed: set[str]) -> dict[str, list[str]]:
    """``module -> distributions providing it`` for every third-party module not covered by ``allowed``
    (an empty list: no installed distribution provides it at all)."""
    providers = md.packages_distributions()
    bad = {}
    for mod in sorted(modules - FIRST_PARTY - set(sys.stdlib_module_names) - {"__future__"}):
        dists = sorted({_norm(d) for d in providers.get(mod, [])})
        if not set(dists) & allowed:
            bad[mod] = dists
    return bad


def test_test_files_import_only_declared_modules():
    allowed = declared(("test",))
    found = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        bad = undeclared(imported_modules(path.read_text()), allowed)
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    assert not found, f"imports not declared in pyproject.toml (dependencies or the test extra): {found}"


def test_package_imports_only_declared_modules_at_import_time():
    allowed = declared(())
    found = {}
    for path in sorted((ROOT / "csd_compile").rglob("*.py")):
        bad = undeclared(imported_modules(path.read_text(), top_level_only=True), allowed)
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    assert not found, f"module-level imports not declared in pyproject.toml dependencies: {found}"


def test_the_check_catches_an_undeclared_import():
    src = "import os\nimport torch\nfrom hypothesis import given\n\ndef f():\n    import pytest\n"
    assert imported_modules(src) == {"os", "torch", "hypothesis", "pytest"}
    assert imported_modules(src, top_level_only=True) == {"os", "torch", "hypothesis"}
    # hypothesis and pytest are only in the test extra: without it they are flagged, torch is not
    assert set(undeclared(imported_modules(src), declared(()))) == {"hypothesis", "pytest"}
    assert undeclared(imported_modules(src), declared(("test",))) == {}
    assert undeclared({"surely_not_an_installed_module"}, declared()) == {"surely_not_an_installed_module": []}
