"""The layout rules of DEVELOPERS.md, checked on the source: imports flow one way, the leaf
modules stay leaves, command-line flags live in command-line modules, functions stay short."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "cryknn"
MAX_FUNCTION_LINES = 80
# Modules every other module may use; they import nothing from cryknn but each other.
LEAVES = {"cryknn.errors": set(), "cryknn.util": set(), "cryknn.families": set(),
          "cryknn.geometry": set(), "cryknn.elements": {"cryknn.errors"}}
MAX_MODULE_LINES = 500
# The tools (`cryknn <subcommand>`) and the `python -m cryknn.<name>` modules that run them:
# nothing imports them but the `cryknn` dispatcher and those entry points, and only they
# (with their flag plumbing, `cryknn.cli.command`, and experiments) define flags.
TOOLS = {"cryknn.cli.train", "cryknn.cli.featurize", "cryknn.cli.data", "cryknn.cli.predict"}
ENTRY_POINTS = {"cryknn.main", "cryknn.featurize", "cryknn.data", "cryknn.predict"}
COMMAND_LINE = TOOLS | ENTRY_POINTS


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in PACKAGE.rglob("*.py")}


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    """cryknn modules imported anywhere in the module, inside functions too."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from package import module` imports the module; `from module import name`
            # the module itself.
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            if not any(name in known for name in names):
                names = [node.module]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(tree, set(modules)) - {name} for name, tree in modules.items()}


def test_imports_have_no_cycle():
    graph = _graph()
    done, path = set(), []

    def visit(node):
        if node in path:
            cycle = path[path.index(node):] + [node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        path.append(node)
        for child in sorted(graph[node]):
            visit(child)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_leaf_modules_stay_leaves():
    graph = _graph()
    for leaf, allowed in LEAVES.items():
        assert graph[leaf] <= allowed, (leaf, graph[leaf] - allowed)


def test_only_the_dispatcher_and_entry_points_import_the_tools():
    for name, imported in _graph().items():
        if name not in {"cryknn.cli", "cryknn.cli.__main__"} | ENTRY_POINTS:
            assert not imported & COMMAND_LINE, (name, imported & COMMAND_LINE)


def test_entry_points_only_run_their_tool():
    graph = _graph()
    for name in ENTRY_POINTS:
        assert len(graph[name]) == 1 and graph[name] <= TOOLS, (name, graph[name])


def test_dataset_builder_imports_only_the_reader_and_the_family_rules():
    graph = _graph()
    builder = {name: deps for name, deps in graph.items()
               if name.startswith("cryknn.datasets.crystal_structures")}
    reader = {name for name in graph if name == "cryknn.cif" or name.startswith("cryknn.cif.")}
    allowed = {"cryknn.families", "cryknn.elements", "cryknn.errors", "cryknn.util",
               "cryknn.geometry", "cryknn.nearcopies"} | reader | set(builder)
    for name, deps in builder.items():
        assert deps <= allowed, (name, deps - allowed)


def test_flags_are_defined_only_in_command_line_code():
    for name, tree in _modules().items():
        if name in COMMAND_LINE or name == "cryknn.cli.command":
            continue
        calls = [node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and isinstance(node.func, ast.Attribute) and node.func.attr.startswith("DEFINE")]
        assert not calls, (name, calls)


def test_functions_are_short():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines})")
    assert not long, long


def test_modules_are_short():
    long = [f"{path.relative_to(REPO)} ({n})" for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, long
