"""The package's layers, as docs/architecture.md states them, checked on the source: what each layer
may import, no import circle, one owner each for torch.cuda and for the terminal, and the torch-free
layer importable without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bsplan"
# Each layer and the layers it may import, bottom first (bsplan/autobatch.py re-exports the runtime's).
MAY_IMPORT = {
    "planning": {"planning"},
    "backends": {"planning", "backends"},
    "models": {"planning", "models"},
    "measure": {"planning", "backends", "models", "measure"},
    "runtime": {"planning", "backends", "models", "measure", "runtime"},
    "cli": {"planning", "backends", "models", "measure", "runtime", "cli"},
    "api": {"planning", "backends", "models", "measure", "runtime", "api"},
    "integrations": {"planning", "backends", "models", "measure", "api", "integrations"},
    "autobatch": {"runtime"},
    "__init__": {"api"},
}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Every module of the package by its dotted name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module a file imports, wherever the import stands (a function's lazy import counts)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append((node.module, node.lineno))
            names += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return names


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _bsplan_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    return {name for name, _ in _imports(path) if name in modules and name != "bsplan"}


def test_each_layer_imports_only_the_layers_below_it() -> None:
    modules = _modules()
    wrong = [
        f"{module} imports {target}"
        for module, path in modules.items() if module != "bsplan"
        for target in _bsplan_imports(path, modules) if _layer(target) not in MAY_IMPORT[_layer(module)]
    ]
    assert not wrong


def test_no_import_circle() -> None:
    modules = _modules()
    graph = {module: _bsplan_imports(path, modules) - {module} for module, path in modules.items()}
    done: set[str] = set()

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            raise AssertionError(" -> ".join(trail[trail.index(module):] + [module]))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, trail + [module])
        done.add(module)

    for module in graph:
        visit(module, [])


def _uses(path: Path, owner: str) -> list[int]:
    """Lines where a file uses `owner` (torch.cuda, typer, rich) in code, not in words."""
    tree = ast.parse(path.read_text())
    lines = [line for name, line in _imports(path) if name == owner or name.startswith(owner + ".")]
    if "." in owner:  # an attribute: torch.cuda
        base, attribute = owner.split(".")
        lines += [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == attribute
                  and isinstance(node.value, ast.Name) and node.value.id == base]
    return lines


def test_torch_cuda_is_called_in_the_cuda_backend_only() -> None:
    users = {module for module, path in _modules().items() if _uses(path, "torch.cuda")}
    assert users == {"bsplan.backends.cuda"}


def test_only_the_cli_knows_the_terminal() -> None:
    for owner in ("typer", "rich"):
        users = {module for module, path in _modules().items() if _uses(path, owner)}
        assert users and all(_layer(module) == "cli" for module in users), (owner, users)


def test_no_module_is_longer_than_the_limit() -> None:
    long = {module: n for module, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_probe_estimate_and_plan_are_free_names_of_the_package() -> None:
    """bsplan.probe, bsplan.estimate and bsplan.plan are kept for the package's own functions."""
    assert not {"probe", "estimate", "plan"} & {path.stem for path in PACKAGE.iterdir()}


def test_the_planning_layer_imports_without_torch() -> None:
    planning = [module for module in _modules() if _layer(module) == "planning"]
    assert "bsplan.planning.planner" in planning and "bsplan.planning.prediction" in planning
    code = (f"import sys\nfor name in {planning!r}: __import__(name)\n"
            "print(sorted(m for m in ('torch', 'typer', 'rich', 'numpy') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
