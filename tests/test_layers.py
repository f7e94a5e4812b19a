"""The package's layers: a lower one never imports a higher one, and siblings not each other.

Every ``import`` and ``from ... import`` in every module counts, those inside functions too (the
CLI imports lazily; a lazy import still ties the layers together).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "retrieval"
# Layer of each part of the package; a module may import its own part and lower layers only.
CORE = {"errors", "outcomes", "progress", "durable", "plotting", "vectors"}  # one layer, the lowest
LAYERS = {
    "core": 0,
    "model": 1,
    "ingest": 2,
    "store": 3,
    "ann": 4,
    "build": 5,
    "search": 5,
    "evaluation": 6,
    "training": 6,
    "service": 7,
    "client": 7,
    "cli": 8,
}


def part_of(module: str) -> str | None:
    """``retrieval.store.folder`` -> ``store``; None outside the package or for the package itself."""
    names = module.split(".")
    if names[0] != "retrieval" or len(names) == 1:
        return None
    return "core" if names[1] in CORE else names[1]


def imports(source: str, here: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source`` (the module ``here``), relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here.rsplit(".", node.level)[0]
                base = f"{parent}.{base}" if base else parent
            found.append((node.lineno, base))
            if base == "retrieval":  # `from retrieval import x`: x may be a part
                found += [(node.lineno, f"retrieval.{alias.name}") for alias in node.names]
    return found


def upward(own: str, found: list[tuple[int, str]]) -> list[str]:
    """The imports of a module of part ``own`` that reach a layer not below it."""
    wrong = []
    for line, module in found:
        other = part_of(module)
        if other is None or other == own or other not in LAYERS:
            continue
        if LAYERS[other] >= LAYERS[own]:
            wrong.append(f"line {line}: {module} ({other}, layer {LAYERS[other]})")
    return wrong


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def own_part(path: Path) -> str:
    return part_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)) or ""


def test_every_part_has_a_layer() -> None:
    parts = {own_part(p) for p in MODULES}
    assert parts <= set(LAYERS), parts - set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down(path: Path) -> None:
    own = own_part(path)
    here = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    wrong = upward(own, imports(path.read_text(), here))
    assert not wrong, f"{own} (layer {LAYERS[own]}) imports a layer not below it: {wrong}"


def test_the_check_sees_lazy_relative_and_sibling_imports() -> None:
    lazy = "def f():\n    from retrieval.search.retriever import Retriever\n"
    assert upward("store", imports(lazy, "retrieval.store.x")) == [
        "line 2: retrieval.search.retriever (search, layer 5)"
    ]
    relative = "from ..build import pipeline\n"
    assert upward("search", imports(relative, "retrieval.search.x")) == [
        "line 1: retrieval.build (build, layer 5)"
    ]
    assert (
        upward(
            "cli", imports("from retrieval import build_index\nimport retrieval.store\n", "retrieval.cli.x")
        )
        == []
    )
