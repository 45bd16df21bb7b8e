"""The package's layout: imports run one way, and the cheap entry points stay cheap."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "dimcut"


def _unit(module: str) -> str:
    """The layer a module belongs to: a top-level module, or a sub-package as a whole."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _imports() -> dict[str, set[str]]:
    """dimcut unit -> dimcut units it imports anywhere (module level or inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(p for p in relative.parts if p != "__init__")
        unit = _unit(module)
        targets = graph.setdefault(unit, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.startswith("dimcut.") and _unit(name) != unit:
                    target = _unit(name)
                    if (PACKAGE / target.split(".")[1]).exists() or (
                        PACKAGE / f"{target.split('.')[1]}.py"
                    ).exists():
                        targets.add(target)
    return graph


def test_imports_have_no_cycles():
    graph = _imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(unit: str) -> None:
        state[unit] = 1
        stack.append(unit)
        for target in sorted(graph.get(unit, ())):
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[unit] = 2

    for unit in sorted(graph):
        if unit not in state:
            visit(unit)


def test_runtime_modules_never_import_the_bench_harness():
    graph = _imports()
    users = sorted(u for u, targets in graph.items() if "dimcut.bench" in targets)
    assert users in ([], ["dimcut.cli"]), users


def _modules_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    return set(result.stdout.split())


def test_import_dimcut_and_the_laws_commands_do_not_import_torch(tmp_path):
    assert "torch" not in _modules_after("import dimcut")
    fit = Path(__file__).resolve().parents[1] / "docs" / "results" / "fit.json"
    loaded = _modules_after(
        "from dimcut.cli import main\n"
        f"assert main(['predict', '--fit', {str(fit)!r}, '--model', 'SmolLM2-slicegpt', "
        "'--sparsity', '0.3']) == 0"
    )
    assert "torch" not in loaded and "transformers" not in loaded


def test_the_sliced_class_is_registered_when_transformers_is_imported_later():
    loaded = _modules_after(
        "import dimcut\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "assert 'dimcut_sliced' in CONFIG_MAPPING, 'not registered'"
    )
    assert "dimcut.modeling_dimcut" in loaded


def test_the_plan_format_is_defined_once():
    """The engine parses op dicts by its OP_KEYS; the typed TensorOp the planner builds has
    exactly those fields."""
    from dataclasses import fields

    from dimcut import _core
    from dimcut.engine import TensorOp

    assert tuple(f.name for f in fields(TensorOp)) == _core.OP_KEYS
