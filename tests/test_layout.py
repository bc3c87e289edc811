"""The package's layering: imports point one way, and the engine has one entrance.

Read from the source with ``ast``, so that a new import that breaks a rule
fails here before anyone has to untangle it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flask_scoria"
#: The usual Flask-extension shape: ``init_app`` imports the CLI and the blueprint.
DEFERRED = {
    ("flask_scoria.extension", "flask_scoria.cli"),
    ("flask_scoria.extension", "flask_scoria.operator"),
}
#: What the engine must never import: the layers above it.
ABOVE_ENGINE = (
    "flask_scoria.extension",
    "flask_scoria.cli",
    "flask_scoria.operator",
    "flask_scoria.verify",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import the module runs, skipping ``if TYPE_CHECKING:`` blocks."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def imports_of(name: str) -> set[str]:
    """The ``flask_scoria`` modules that module ``name`` imports."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            origin = ".".join([*base, *([node.module] if node.module else [])])
        else:
            origin = node.module or ""
        for alias in node.names:
            submodule = f"{origin}.{alias.name}"
            targets.add(submodule if submodule in MODULES else origin)
    return {target for target in targets if target in MODULES and target != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_engine_imports_nothing_above_it() -> None:
    offending = {
        (name, target)
        for name, targets in GRAPH.items()
        if name.startswith("flask_scoria.runtime")
        for target in targets
        if target.startswith(ABOVE_ENGINE)
    }
    assert offending == set()


def test_only_the_package_imports_the_extension_module() -> None:
    importers = {name for name, targets in GRAPH.items() if "flask_scoria.extension" in targets}
    assert importers == {"flask_scoria"}


def test_the_engine_is_entered_through_runtime_init() -> None:
    reaching_in = {
        (name, target)
        for name, targets in GRAPH.items()
        if not name.startswith("flask_scoria.runtime")
        for target in targets
        if target.startswith("flask_scoria.runtime.")
    }
    assert reaching_in == set()


def test_imports_form_no_circle_but_the_deferred_ones() -> None:
    edges = {
        name: targets - {b for a, b in DEFERRED if a == name} for name, targets in GRAPH.items()
    }
    # The package's __init__ re-exports everything: it sits on top, imported by nobody inside.
    edges = {name: targets - {"flask_scoria"} for name, targets in edges.items()}
    state: dict[str, str] = {}
    circles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(edges[name]):
            if state.get(target) == "open":
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert circles == []


@pytest.mark.parametrize("name", ["flask_scoria.runtime.steps", "flask_scoria.operator.views"])
def test_the_graph_sees_relative_imports(name: str) -> None:
    # Guards the parser above: these modules import known neighbours.
    expected = {
        "flask_scoria.runtime.steps": "flask_scoria.runtime.statements",
        "flask_scoria.operator.views": "flask_scoria.runtime",
    }[name]
    assert expected in GRAPH[name]
