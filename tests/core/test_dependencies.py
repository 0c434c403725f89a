"""Every third-party package that swarmlm's source imports is declared in pyproject.toml."""

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:          # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def imported_top_level_names() -> dict[str, str]:
    """{top-level module: a file importing it} over src/swarmlm, absolute imports only."""
    names: dict[str, str] = {}
    for path in sorted((ROOT / "src" / "swarmlm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found = [node.module]
            else:
                continue
            for name in found:
                names.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return names


def declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    return {_normal(re.match(r"[A-Za-z0-9._-]+", spec).group(0)) for spec in specs}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_is_a_declared_dependency():
    declared = declared_distributions()
    by_module = metadata.packages_distributions()
    undeclared = {}
    for module, where in imported_top_level_names().items():
        if module == "swarmlm" or module in sys.stdlib_module_names:
            continue
        dists = {_normal(d) for d in by_module.get(module, [module])}
        if not dists & declared:
            undeclared[module] = where
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
