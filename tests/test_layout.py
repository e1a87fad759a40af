"""The layout tells the architecture: each layer imports only the layers below it (checked on the source)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import decodekit

PACKAGE = Path(decodekit.__file__).parent
FACES = ("decodekit.cli", "decodekit.bench", "decodekit.server")  # what users run (one may start another)
ENGINE_SURFACE = {
    "decodekit",
    "decodekit.engine",
    "decodekit.errors",
    "decodekit.integrations.transformers",
    "decodekit.prompts",
    "decodekit.train.eagle",
    "decodekit.train.heads",
    "decodekit.train.kangaroo",
}


def imports(path: Path) -> set[str]:
    """The decodekit modules a source file imports (at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "decodekit" or name.startswith("decodekit.")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def test_the_protocol_is_the_bottom():
    assert imports(SOURCES["decodekit.protocol"]) <= {"decodekit.errors"}


@pytest.mark.parametrize("name", [n for n in SOURCES if n.startswith("decodekit.drafters")])
def test_drafters_see_the_protocol_not_the_engine(name):
    allowed = {"decodekit.protocol", "decodekit.errors", "decodekit.verify"}
    assert {m for m in imports(SOURCES[name]) if not m.startswith("decodekit.drafters")} <= allowed


@pytest.mark.parametrize("name", [n for n in SOURCES if n.startswith(FACES)])
def test_faces_reach_the_engine_and_nothing_below_it(name):
    below = {m for m in imports(SOURCES[name]) if not m.startswith(FACES) and m not in ENGINE_SURFACE}
    assert not below, f"{name} imports {sorted(below)}: go through decodekit.engine"


@pytest.mark.parametrize("name", [n for n in SOURCES if n.startswith("decodekit.strategies")])
def test_strategies_run_the_runtime_and_nothing_above_it(name):
    allowed = ("decodekit.strategies", "decodekit.runtime", "decodekit.protocol", "decodekit.errors")
    below = {m for m in imports(SOURCES[name]) if not m.startswith(allowed)}
    assert below <= {"decodekit.drafters.options"}, f"{name} imports {sorted(below)}"


@pytest.mark.parametrize("name", [n for n in SOURCES if n.startswith("decodekit.integrations")])
def test_integrations_drive_drafters_without_the_engine(name):
    allowed = {
        "decodekit.decoding",
        "decodekit.drafters",
        "decodekit.protocol",
        "decodekit.sampling",
        "decodekit.verify",
        "decodekit.errors",
        "decodekit.runtime.tree",
    }
    below = {m for m in imports(SOURCES[name]) if not m.startswith(("decodekit.drafters.", "decodekit.integrations"))}
    assert below <= allowed, f"{name} imports {sorted(below - allowed)}"
