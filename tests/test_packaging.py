"""pyproject.toml tells the truth: every import in src/ is a declared dependency (one of an extra only
inside a function, so the package imports without it), every declared dependency is used, the loggers
the code offers as extras are extras, and the tensorboard extra gives a default training its curves."""

from __future__ import annotations

import ast
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mhsupport import pipeline
from mhsupport.training import curves

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "mhsupport"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# Dependencies that src/ does not import but needs at run time, and what for.
USED_WITHOUT_IMPORT = {"accelerate": "the Trainer runs on it", "gguf": "transformers reads GGUF weights with it"}


def names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


CORE = names(PROJECT["dependencies"])
EXTRAS = {extra: names(requirements) for extra, requirements in PROJECT["optional-dependencies"].items()
          if extra != "dev"}


def src_imports() -> list[tuple[str, int, str, bool]]:
    """(file, line, top-level module, inside a function) of every absolute import of another package."""
    found = []
    for file in sorted(SRC.rglob("*.py")):
        tree = ast.parse(file.read_text(), str(file))
        in_function = {id(node) for function in ast.walk(tree)
                       if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for node in ast.walk(function) if node is not function}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("mhsupport", "__future__"):
                    found.append((str(file.relative_to(REPO)), node.lineno, top, id(node) in in_function))
    return found


def distributions(module: str) -> set[str]:
    """The distributions that install a top-level module (the module's own name when none installed here)."""
    return {canonicalize_name(name) for name in packages_distributions().get(module, [module])}


def test_every_import_in_src_is_declared():
    undeclared = []
    for file, line, module, lazy in src_imports():
        allowed = CORE | (set().union(*EXTRAS.values()) if lazy else set())
        if not distributions(module) & allowed:
            where = "dependencies or an extra" if lazy else "dependencies (or imported inside a function, from an extra)"
            undeclared.append(f"{file}:{line} imports {module} ({', '.join(sorted(distributions(module)))}), "
                              f"not in pyproject.toml's {where}")
    assert not undeclared, "\n".join(undeclared)


def test_every_declared_dependency_is_used():
    imported = set().union(*(distributions(module) for _, _, module, _ in src_imports()))
    unused = CORE - imported - set(USED_WITHOUT_IMPORT)
    assert not unused, f"declared in pyproject.toml but never imported in src/: {sorted(unused)}"


def test_the_loggers_offered_as_extras_are_extras_and_dev_installs_them():
    for logger in curves.EXTRAS:
        assert logger in EXTRAS[logger], f"`pip install 'mhsupport[{logger}]'` must install {logger}"
    dev = [Requirement(r) for r in PROJECT["optional-dependencies"]["dev"]]
    assert any(r.name == "mhsupport" and set(curves.EXTRAS) <= r.extras for r in dev)


def test_the_tensorboard_extra_gives_a_default_training_its_curves(make_cfg, prepared):
    for requirement in PROJECT["optional-dependencies"]["tensorboard"]:
        requirement = Requirement(requirement)
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            pytest.fail(f"the tensorboard extra is not installed: `pip install -e '.[dev]'`")
        assert installed in requirement.specifier, f"{requirement.name} {installed} is outside {requirement}"
    cfg = make_cfg("train_generator", "generator=tiny", "generator.train_subset=32", "generator.valid_subset=8",
                   "generator.batch_size=8", "trainer.max_steps=2", "runtime.logging_steps=1")
    assert cfg.runtime.report_to == "auto"
    run = pipeline.run("train_generator", cfg).run
    assert list((run.path / curves.TENSORBOARD_DIR).rglob("events.out.tfevents.*"))
