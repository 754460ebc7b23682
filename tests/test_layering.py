"""The shape of the code: layers in README's "Code layout" order (import-linter's contracts in
pyproject.toml), no import cycles, task knowledge only in the task registry, one module that renames files
into place, small functions; and how tests/conftest.py tells an integration test from a unit test.

Each failure names the module, import or function that breaks the rule.
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "subclone_core"
TASK_WORDS = ('"causal-lm"', '"image-classification"', '"tokens/s"', '"images/s"')


@functools.cache
def _nodes(path: Path) -> tuple[ast.AST, ...]:
    """Every node of a source file's syntax tree, parsed and walked once per run (several rules read them)."""
    return tuple(ast.walk(ast.parse(path.read_text())))


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules a file imports, anywhere in it (a late import inside a function counts too);
    importing a submodule also runs its package's __init__."""
    found = set()
    for node in _nodes(path):
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
            for p in files for n in _nodes(p)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 50]
    assert not long, long


# --- layers -----------------------------------------------------------------------------------------------
def test_each_layer_imports_only_the_layers_below_it(capsys):
    """pyproject.toml's [tool.importlinter] contracts: core -> data -> tasks -> io -> pipeline -> training ->
    sources -> workflow -> analysis -> cli | app, every import counted (a late one inside a function too), and a
    core that needs no app, plotting, data-set or file-format library."""
    from importlinter.cli import lint_imports

    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out


# --- test tiers (tests/conftest.py) ---------------------------------------------------------------------------
def _starts_a_process() -> object:
    return subprocess.run


def _calls_a_helper_that_starts_one() -> object:
    return _starts_a_process()


def _stays_in_process() -> object:
    return ast.parse("x = 1")


@pytest.mark.unit  # it only names subprocess, through the helpers above: the hook alone would say integration
def test_the_tier_hook_sees_a_subprocess_through_the_helpers_a_test_calls():
    from tests.conftest import _reaches_integration

    assert _reaches_integration(_calls_a_helper_that_starts_one, set())
    assert not _reaches_integration(_stays_in_process, set())


# --- one place for each kind of knowledge -------------------------------------------------------------------
KEY_TEST = re.compile(r"""["'](perplexity|accuracy)["']\s+(not\s+)?in\b""")


def _sources() -> list[Path]:
    return [*PACKAGE.rglob("*.py"), *(ROOT / "pages").glob("*.py"), ROOT / "app.py", *(ROOT / "bench").glob("*.py")]


KEY_READ = re.compile(r"""\.get\(\s*["'](perplexity|accuracy)["']""")
EVENT_READ = re.compile(r"""(\.get\(\s*|\[\s*)["']event["']""")
EVENTS = PACKAGE / "training" / "events.py"


def _lines_matching(pattern: re.Pattern, allowed: Path) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in _sources() if p != allowed
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]


def test_only_the_task_registry_tests_result_keys_for_a_metric():
    found = _lines_matching(KEY_TEST, PACKAGE / "tasks.py") + _lines_matching(KEY_READ, PACKAGE / "tasks.py")
    assert not found, "read the metric from the TaskSpec instead: " + "; ".join(found)


def test_only_the_events_module_reads_an_events_kind_from_its_json():
    found = _lines_matching(EVENT_READ, EVENTS)
    assert not found, "use the typed events (training.events.parse_event, isinstance): " + "; ".join(found)


def _renames(path: Path) -> list[str]:
    """Calls that rename a file: os.replace/os.rename, and Path.replace/Path.rename (one positional argument,
    no keywords: str.replace takes two, dataclasses.replace and datetime.replace take keywords)."""
    found = []
    for node in _nodes(path):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        attr, owner = node.func.attr, node.func.value
        if attr in ("replace", "rename") and isinstance(owner, ast.Name) and owner.id == "os":
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} os.{attr}")
        elif attr in ("replace", "rename") and len(node.args) == 1 and not node.keywords:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{attr}()")
    return found


def test_exactly_one_module_renames_files_into_place():
    renames = {p: _renames(p) for p in _sources()}
    others = [r for p, found in renames.items() if p != ATOMIC for r in found]
    assert not others, f"use {ATOMIC.relative_to(ROOT)} (building, building_file, write_text): {others}"
    assert renames[ATOMIC], "the atomic-write module no longer renames anything: update this test"


ATOMIC = PACKAGE / "io" / "atomic.py"
