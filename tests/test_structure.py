"""The package's structure: no import cycle between selma_toolkit's modules (imports inside
functions included), and the start-up paths (`selma --help`, ComfyUI importing the node pack)
free of the heavy libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "selma_toolkit"


def package_modules() -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of selma_toolkit (a package as its __init__)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@dataclass(frozen=True)
class Import:
    """One import statement that runs (not under ``if TYPE_CHECKING:``): what it names, where."""

    names: tuple[str, ...]  # dotted names: package modules, or a library's
    in_function: bool
    line: int


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """The imports of module ``name`` (``from a import b`` names the module ``a.b`` when b is one)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_checking = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    in_functions = {
        id(node)
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(function)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            names = tuple(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from its own package
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = tuple(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        else:
            continue
        found.append(Import(names, id(node) in in_functions, node.lineno))
    return found


def _runs(name: str, target: str, modules: dict[str, Path]) -> set[str]:
    """The package modules that importing ``target`` from ``name`` runs: it and its packages, except
    those ``name`` is inside (they are running already)."""
    return {target, *(a for a in _ancestors(target) if a in modules and a not in _ancestors(name))} - {name}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: the package modules it imports}``: imports at module level and inside functions."""
    return {
        name: {
            run
            for found in imports_of(name, path, modules)
            for target in found.names
            if target in modules
            for run in _runs(name, target, modules)
        }
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for child in graph.get(node, ()):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_in_the_package_imports_inside_functions_included():
    graph = import_graph(package_modules())
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle_through_an_import_inside_a_function(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import x\n")
    (package / "b.py").write_text("def f():\n    from pkg import a\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import y\n")
    modules = {"pkg": package / "__init__.py", **{f"pkg.{m}": package / f"{m}.py" for m in "abc"}}
    graph = import_graph(modules)
    assert graph["pkg.c"] == set()  # what only a type checker reads never runs
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_the_config_package_is_the_bottom_floor():
    """config/ imports no module of the package but errors and its own (what it holds is pure data)."""
    graph = import_graph(package_modules())
    for name, imported in graph.items():
        if name.startswith("selma_toolkit.config"):
            assert {m for m in imported if not m.startswith("selma_toolkit.config")} <= {"selma_toolkit.errors"}, name


# Libraries slow enough to import (about 0.1 s and more here) that start-up paths import them late.
HEAVY = frozenset(
    {
        "torch",
        "diffusers",
        "transformers",
        "peft",
        "accelerate",
        "numpy",
        "PIL",
        "openai",
        "huggingface_hub",
        "datasets",
        "pydantic",
        "matplotlib",
        "open_clip",
        "ImageReward",
        "torchmetrics",
    }
)


def deferred_imports(modules: dict[str, Path]) -> list[tuple[str, str, int, set[str]]]:
    """(module, package module it imports inside a function, line, the heavy libraries that import
    loads and the module does not load at its own import) of every import inside a function."""
    found = {name: imports_of(name, path, modules) for name, path in modules.items()}

    @cache
    def loads(name: str) -> frozenset[str]:  # heavy libraries loaded when ``name`` is imported
        top = [target for entry in found[name] if not entry.in_function for target in entry.names]
        heavy = {t.split(".")[0] for t in top if t.split(".")[0] in HEAVY}
        for target in (t for t in top if t in modules):
            heavy |= {lib for run in _runs(name, target, modules) for lib in loads(run)}
        return frozenset(heavy)

    return [
        (name, target, entry.line, set(loads(target) - loads(name)))
        for name, entries in found.items()
        for entry in entries
        if entry.in_function
        for target in entry.names
        if target in modules
    ]


def test_an_import_inside_a_function_defers_a_heavy_library():
    """A package module is imported inside a function only to load a heavy library late that the
    importing module does not load already; anything else goes at the top of the module (the
    cycle test keeps the graph acyclic). The CLI's commands are the exception: they import what a
    command needs, so that `selma --help` starts fast."""
    needless = [
        f"{name}:{line} imports {target}"
        for name, target, line, heavy in deferred_imports(package_modules())
        if not heavy and not name.startswith("selma_toolkit.cli")
    ]
    assert needless == []


@pytest.mark.parametrize(
    ("code", "absent"),
    [
        ("import selma_toolkit.cli, selma_toolkit.recipe, selma_toolkit.config.registries", ("torch", "diffusers")),
        ("import comfyui_nodes", ("diffusers", "transformers", "peft", "accelerate")),
    ],
)
def test_start_up_imports_no_heavy_library(code, absent):
    """`selma --help` (the CLI module and the recipe) imports no torch; ComfyUI, which has torch
    loaded already, gets a node pack that imports no diffusers, transformers, peft or accelerate."""
    check = f"import sys; {code}; loaded = [m for m in {absent!r} if m in sys.modules]; assert not loaded, loaded"
    subprocess.run([sys.executable, "-c", check], check=True, cwd=ROOT)


def test_help_imports_no_torch():
    check = (
        "import sys; from selma_toolkit.cli import app; from typer.testing import CliRunner; "
        "assert CliRunner().invoke(app, ['--help']).exit_code == 0; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", check], check=True, cwd=ROOT)
