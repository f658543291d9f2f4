"""Imports sit at the top of a module, so the import graph can be read from the source.

An import inside a function is allowed only for an optional or heavy dependency kept off the path of
``import bnnzoo`` and of the command line's start-up; it carries a trailing ``# lazy: <reason>``
comment on its line, and what it imports must indeed not be loaded by that start-up.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the package it installs as
PACKAGES = {"bnnzoo": "bnnzoo", "models": "bnnzoo.models", "guides": "bnnzoo.guides"}
LAZY_COMMENT = re.compile(r"#\s*lazy:\s*\S")
#: heavy or optional dependencies that the start-up must not load
HEAVY = ("arviz", "matplotlib", "flwr", "xarray", "scipy")


@dataclass(frozen=True)
class FunctionImport:
    where: str  # file:line, the file relative to the repository root
    modules: tuple[str, ...]  # the absolute names of the modules the statement imports
    commented: bool


def module_name(path: Path, root: Path) -> str:
    """The installed module name of a source file (``guides/bmr.py`` -> ``bnnzoo.guides.bmr``)."""
    rel = path.relative_to(root)
    parts = [PACKAGES[rel.parts[0]], *rel.with_suffix("").parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(node: ast.Import | ast.ImportFrom, path: Path, root: Path) -> tuple[str, ...]:
    if isinstance(node, ast.Import):
        return tuple(alias.name for alias in node.names)
    if not node.level:
        return (node.module,)
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package.pop()
    base = ".".join(package[:len(package) - node.level + 1])
    if node.module:
        return (f"{base}.{node.module}",)
    return tuple(f"{base}.{alias.name}" for alias in node.names)  # from . import x: x is a submodule


def function_imports(path: Path, root: Path = ROOT) -> list[FunctionImport]:
    """Every import statement of ``path`` (under the repository ``root``) inside a function, at any depth."""
    source = path.read_text()
    lines = source.splitlines()
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                text = lines[child.lineno - 1:child.end_lineno]
                found.append(FunctionImport(f"{path.relative_to(root)}:{child.lineno}",
                                            imported_modules(child, path, root),
                                            any(LAZY_COMMENT.search(line) for line in text)))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source, filename=str(path)), False)
    return found


def source_files() -> list[Path]:
    return sorted(p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def startup_modules() -> set[str]:
    """The modules loaded by ``import bnnzoo`` and the command line's start-up (a fresh interpreter)."""
    code = "import json, sys; import bnnzoo, bnnzoo.cli; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_scan_finds_function_imports_and_their_comments(tmp_path):
    path = tmp_path / "bnnzoo" / "federated" / "demo.py"
    path.parent.mkdir(parents=True)
    path.write_text("import torch\n\n\ndef f():\n    import arviz as az  # lazy: heavy\n    from .run import (\n"
                    "        run_federated,\n    )\n\n\nclass C:\n    def m(self):\n        from . import codec, "
                    "strategy\n        return lambda: __import__('x')\n")
    found = function_imports(path, root=tmp_path)
    assert found == [
        FunctionImport("bnnzoo/federated/demo.py:5", ("arviz",), True),
        FunctionImport("bnnzoo/federated/demo.py:6", ("bnnzoo.federated.run",), False),
        FunctionImport("bnnzoo/federated/demo.py:13", ("bnnzoo.federated.codec", "bnnzoo.federated.strategy"), False)]


def test_no_function_level_import_without_a_lazy_comment():
    offenders = [f for path in source_files() for f in function_imports(path) if not f.commented]
    assert not offenders, ("imports inside functions without a '# lazy: <reason>' comment (move them to the top "
                           "of the module):\n" + "\n".join(f"  {f.where}: {', '.join(f.modules)}" for f in offenders))


def test_lazy_imports_keep_their_modules_off_the_startup_path(startup_modules):
    """A lazy import is worth its comment only if ``import bnnzoo`` and the CLI do not load its module."""
    lazy = [f for path in source_files() for f in function_imports(path) if f.commented]
    needless = [(f, m) for f in lazy for m in f.modules if m in startup_modules]
    assert not needless, ("lazy imports of modules that the start-up loads anyway (import them at the top):\n"
                          + "\n".join(f"  {f.where}: {m}" for f, m in needless))


@pytest.mark.parametrize("module", HEAVY)
def test_the_startup_does_not_load_heavy_or_optional_dependencies(startup_modules, module):
    assert module not in startup_modules, f"`import bnnzoo` or the bnnzoo command's start-up imports {module}"
