"""The architecture as checks: the import contracts of pyproject.toml (import-linter), the same
package rules and the absence of import circles by a walk over every module's AST (imports inside
functions count; ``if TYPE_CHECKING:`` blocks do not), and no function over 100 lines."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "biomedvital"

STAGES = {"generation", "selection", "tuning", "evaluation", "annotation", "figures"}
LOWER = {"data", "tracking", "llm", "config_keys", "grid_identity"}
ALLOWED: dict[str, set[str]] = {
    "data": set(),
    "tracking": {"data"},
    "llm": {"data", "tracking"},
    "config_keys": set(),
    "grid_identity": set(),
    **{stage: set(LOWER) for stage in STAGES},
    "evaluation": LOWER | {"tuning"},
    "cli": LOWER | STAGES,
    "grid": LOWER | STAGES | {"cli", "grid_costs"},
    "grid_costs": LOWER | STAGES,
    "__main__": LOWER | STAGES | {"cli", "grid"},
}
"""The parts of the package (a sub-package or a top-level module) each part may import."""

LONG_FUNCTION = 100


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node`` (function bodies included) except ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield other
                yield from _walk(other)
            continue
        yield child
        yield from _walk(child)


def _imports(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """(imported module, line) for each import in the module, relative imports resolved; a name
    imported from a package counts as its submodule when it is one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                yield (sub if sub in MODULES else source), node.lineno


def _internal(target: str) -> str | None:
    """The package module ``target`` lives in (itself, or the nearest enclosing one)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def _graph() -> dict[str, set[tuple[str, int]]]:
    return {
        name: {
            (module, line)
            for target, line in _imports(name, path)
            if (module := _internal(target)) is not None and module != name
        }
        for name, path in MODULES.items()
    }


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_ast_walk_sees_imports_inside_functions_and_skips_type_checking() -> None:
    """The checker itself: a function-level import counts, a TYPE_CHECKING one does not."""
    tree_src = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import biomedvital.selection\n"
        "def f():\n    from ..tracking import mlflow\n    return mlflow\n"
    )
    nodes = list(_walk(ast.parse(tree_src)))
    names = [n.module for n in nodes if isinstance(n, ast.ImportFrom)]
    assert names == ["typing", "tracking"]
    plain = [a.name for n in nodes if isinstance(n, ast.Import) for a in n.names]
    assert plain == []


def test_package_rules_hold_counting_imports_inside_functions() -> None:
    graph = _graph()
    unknown = {_part(m) for m in MODULES} - set(ALLOWED) - {""}
    assert not unknown, f"parts of the package with no rule in ALLOWED: {sorted(unknown)}"
    broken = [
        f"{MODULES[src].relative_to(ROOT)}:{line} imports {dst}"
        for src, targets in graph.items()
        for dst, line in sorted(targets)
        if _part(src) and _part(dst) != _part(src) and _part(dst) not in ALLOWED[_part(src)]
    ]
    assert not broken, "imports across the architecture's rules:\n" + "\n".join(broken)


def test_library_never_imports_experiments_or_bench() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for name, path in MODULES.items()
        for target, line in _imports(name, path)
        if target.split(".")[0] in ("experiments", "bench")
    ]
    assert not found, "\n".join(found)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_between_modules_or_packages() -> None:
    graph = _graph()
    modules = {src: {dst for dst, _ in targets} for src, targets in graph.items()}
    assert not _cycles(modules), f"import circles between modules: {_cycles(modules)}"
    packages: dict[str, set[str]] = {}
    for src, targets in modules.items():
        for dst in targets:
            if _part(src) and _part(dst) and _part(src) != _part(dst):
                packages.setdefault(_part(src), set()).add(_part(dst))
    assert not _cycles(packages), f"import circles between packages: {_cycles(packages)}"


def test_import_contracts_hold() -> None:
    """pyproject.toml's [tool.importlinter] contracts (the same run as ``make lint``)."""
    if importlib.util.find_spec("importlinter") is None:
        pytest.skip("import-linter is not installed (the dev extra installs it)")
    script = Path(sys.executable).with_name("lint-imports")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "importlinter.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [*command, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def _long_functions() -> list[str]:
    found = []
    for path in MODULES.values():
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            said = " ".join(lines[max(node.lineno - 2, 0) : node.lineno])
            if length > LONG_FUNCTION and "# long:" not in said:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_over_100_lines_unless_a_comment_says_why() -> None:
    """A function past 100 lines is split, or its def line (or the line above) carries
    ``# long: <reason>``."""
    found = _long_functions()
    assert not found, "functions over 100 lines with no '# long:' reason:\n" + "\n".join(found)
