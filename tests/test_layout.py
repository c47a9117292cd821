"""The house rules of the layout, checked on the source: imports point down, the model rooms stay free of
the training stack, files stay readable, and every `_target_` in conf/ names something that exists."""

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("models", "analysis", "callbacks", "trainer", "scripts")  # a package may import only those before it
TRAINING_STACK = ("lightning", "hydra", "omegaconf", "wandb")
MAX_LINES = 450


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at any depth of the file (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", ORDER)
def test_imports_only_point_down(package: str) -> None:
    above = ORDER[ORDER.index(package) + 1:]
    upward = {f"{p.relative_to(ROOT)}: {m}" for p in sources(package) for m in imported_modules(p)
              if m.split(".")[0] in above}
    assert not upward


@pytest.mark.parametrize("package", ["models", "analysis"])
def test_models_and_analysis_import_no_training_stack(package: str) -> None:
    found = {f"{p.relative_to(ROOT)}: {m}" for p in sources(package) for m in imported_modules(p)
             if m.split(".")[0] in TRAINING_STACK}
    assert not found


def test_no_source_file_is_longer_than_a_sitting() -> None:
    long = {str(p.relative_to(ROOT)): n for package in (*ORDER, "tests") for p in sources(package)
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_every_config_target_resolves() -> None:
    targets = {m.group(1) for p in (ROOT / "conf").rglob("*.yaml")
               for m in re.finditer(r"_target_:\s*([\w.]+)", p.read_text())}
    assert len(targets) > 10
    for target in sorted(targets):
        module, name = target.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), name), target
