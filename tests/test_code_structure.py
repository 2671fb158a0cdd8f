"""The package keeps the shape its README describes: no import cycles, no reaching into privates, small units."""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, Iterator, List, Set, Tuple

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "delve"
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 80
#: A unit may be longer when a comment starting with this, on the line above it, says why.
REASON = "# long:"


def _modules() -> Dict[str, pathlib.Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, tree: ast.AST) -> Iterator[Tuple[str, str, ast.AST]]:
    """Yield ``(module, imported name or '', node)`` for every import of a delve module, lazy ones too."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "delve":
                    yield alias.name, "", node
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "delve":
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield (submodule, "", node) if submodule in MODULES else (base, alias.name, node)


def _graph() -> Dict[str, Set[str]]:
    graph = {}
    for name, path in MODULES.items():
        edges = set()
        for target, _, _ in _imports(name, ast.parse(path.read_text())):
            while target not in MODULES:
                target = target.rpartition(".")[0]
            # From outside a package, importing delve.writers.base runs delve/writers/__init__.py first:
            # that is an import too (the top package aside, which every import runs first).
            while target.count("."):
                if target != name and not name.startswith(target + "."):
                    edges.add(target)
                target = target.rpartition(".")[0]
        graph[name] = edges
    return graph


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_no_import_cycle_among_delve_modules():
    assert _cycle(_graph()) == []


def test_no_module_reads_another_modules_private_names():
    offences = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for target, imported, node in _imports(name, tree):
            if imported.startswith("_"):
                offences.append(f"{name} imports {imported} from {target}")
            if isinstance(node, ast.ImportFrom) and not imported:  # `from delve import gram as products`
                for alias in node.names:
                    aliases[alias.asname or alias.name] = target
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                offences.append(f"{name} reads {aliases[node.value.id]}.{node.attr}")
    assert offences == []


def _code_lines(node: ast.AST) -> int:
    """Lines of a class or function, its docstrings (and those of what it holds) left out."""
    docs = 0
    for inner in ast.walk(node):
        body = getattr(inner, "body", None)
        if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
                if isinstance(first.value.value, str):
                    docs += first.end_lineno - first.lineno + 1
    return node.end_lineno - node.lineno + 1 - docs


@pytest.mark.parametrize("name", sorted(MODULES))
def test_classes_and_functions_stay_small(name):
    source = MODULES[name].read_text().splitlines()
    too_long = []
    for node in ast.walk(ast.parse("\n".join(source))):
        if isinstance(node, ast.ClassDef):
            limit = MAX_CLASS_LINES
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            limit = MAX_FUNCTION_LINES
        else:
            continue
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        explained = first >= 2 and source[first - 2].strip().startswith(REASON)
        if _code_lines(node) > limit and not explained:
            too_long.append(f"{node.name}: {_code_lines(node)} lines")
    assert too_long == []
