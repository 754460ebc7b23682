"""The shape of the code: no import cycles, task knowledge only in the task registry, small functions.

These read the source as text; each names the module, import or function that breaks the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "subclone_core"
TASK_WORDS = ('"causal-lm"', '"image-classification"', '"tokens/s"', '"images/s"')


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules a file imports, anywhere in it (a late import inside a function counts too);
    importing a submodule also runs its package's __init__."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)} & modules
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    # a package's __init__ never needs to count as importing its own submodules' parents
    return {name: {m for m in _imports(path, modules) if m != name and not name.startswith(m + ".")}
            for name, path in files.items()}


def _cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle through `start`, as a list of modules, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_no_import_cycles():
    graph = _graph()
    cycles = [c for c in (_cycle_from(m, graph) for m in sorted(graph)) if c]
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles[:5])


def test_task_names_and_units_live_only_in_the_task_registry_and_the_arch_tables():
    allowed = {PACKAGE / "tasks.py", *(PACKAGE / "core" / "archs").glob("*.py")}
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "pages").glob("*.py"), ROOT / "app.py"]
    found = [f"{p.relative_to(ROOT)}: {word}" for p in files if p not in allowed
             for word in TASK_WORDS if word in p.read_text()]
    assert not found, found


def test_no_function_over_50_lines():
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "pages").glob("*.py"), ROOT / "app.py"]
    long = [f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in files for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 50]
    assert not long, long
