"""The package's dependencies point one way: no import cycles, no function-local imports that
could hide one, layers that import only the layers below them, and a library that never imports
the command-line tools. Read from the source (ast), not by importing it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mmdistill.config import REPO_ROOT

# Lowest first: a module may import its own layer and those before it.
LAYERS = ("core", "losses", "methods", "config", "tasks", "data", "models", "adapters", "distributed", "evaluation",
          "reporting", "training", "api", "cli")
# The command-line applications: they may import anything, lazily (a quick `--help`).
APPLICATIONS = ("mmdistill.cli", "mmdistill.__main__", "data_tools")
OURS = ("mmdistill", "data_tools")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for root in OURS for p in sorted((REPO_ROOT / root).rglob("*.py"))}


def imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, whether inside a function) for each import of ours."""
    tree = ast.parse(path.read_text(), str(path))
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` depends on the submodule; `from pkg import name` on pkg itself
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        out += [(n, node.lineno, id(node) in local) for n in names if n.split(".")[0] in OURS]
    return out


def layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "mmdistill" or len(parts) < 2:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    found = modules()
    return {m: imports(p, set(found)) for m, p in found.items()}


def is_application(module: str) -> bool:
    return any(module == a or module.startswith(a + ".") for a in APPLICATIONS)


def test_every_module_of_the_library_sits_in_a_layer():
    unplaced = [m for m in modules() if m.startswith("mmdistill.") and not is_application(m) and layer(m) is None]
    assert not unplaced, f"modules outside the layers {LAYERS}: {unplaced}"


def test_no_import_cycles():
    edges = {m: sorted({t for t, _, _ in deps}) for m, deps in graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in edges.get(m, []):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_import_only_the_layers_below_them():
    wrong = [f"{m}:{line} imports {t}" for m, deps in graph().items() for t, line, _ in deps
             if layer(m) is not None and layer(t) is not None and layer(t) > layer(m)]
    assert not wrong, "imports pointing up the layers " + str(LAYERS) + ":\n" + "\n".join(wrong)


def test_the_library_never_imports_the_command_line_tools():
    wrong = [f"{m}:{line} imports {t}" for m, deps in graph().items() for t, line, _ in deps
             if not is_application(m) and (t.startswith("data_tools") or t in ("mmdistill.cli", "mmdistill.__main__"))]
    assert not wrong, "\n".join(wrong)


def test_the_library_imports_its_own_modules_at_the_top():
    """A function-local import of our own code is how a cycle hides; only the applications import
    lazily, to start fast."""
    wrong = [f"{m}:{line} imports {t} inside a function" for m, deps in graph().items() for t, line, inside in deps
             if inside and not is_application(m)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("low, high", [("core", "training"), ("losses", "distributed"), ("data", "evaluation"),
                                       ("tasks", "training"), ("core", "adapters")])
def test_the_named_directions_are_among_the_forbidden_ones(low, high):
    """The lowest layers (core, losses, data, tasks) stay below training, distributed and evaluation."""
    assert LAYERS.index(low) < LAYERS.index(high)
