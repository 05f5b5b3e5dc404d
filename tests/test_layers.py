"""The package's layers: each module imports only from its own layer and the layers below it, so
the import graph has no arrow running back up (data -> modeling -> ... -> the CLI)."""

from __future__ import annotations

import ast
from pathlib import Path

import mhsupport

SRC = Path(mhsupport.__file__).resolve().parent
# Bottom to top; a top-level module or sub-package by its first name under mhsupport.
LAYERS = [
    {"__init__", "errors", "preemption"},
    {"data"},
    {"modeling"},
    {"training"},
    {"evaluation"},
    {"reporting"},
    {"runs"},
    {"settings"},
    {"safety"},
    {"stages"},
    {"pipeline"},
    {"cli", "sweeps", "chat", "generator", "classifier"},
]


def layer_of(module: str) -> int:
    """The layer of `mhsupport.x.y` (or of the package root itself)."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    for index, names in enumerate(LAYERS):
        if name in names:
            return index
    raise AssertionError(f"{module}: in no layer of tests/test_layers.py")


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "mhsupport":
                names.update(f"mhsupport.{alias.name}" for alias in node.names)
    return {name for name in names if name == "mhsupport" or name.startswith("mhsupport.")}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def test_every_module_is_in_a_layer():
    for path in SRC.rglob("*.py"):
        layer_of(module_name(path))


def test_no_import_runs_back_up_the_layers():
    upward = []
    for path in SRC.rglob("*.py"):
        own = layer_of(module_name(path))
        upward += [f"{module_name(path)} -> {name}" for name in sorted(imported(path)) if layer_of(name) > own]
    assert not upward, upward
