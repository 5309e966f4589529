"""The package's layers: imports only go down the order the README writes down.

Every import between `gateway/` modules counts, also one inside a function:
a lazy import is still a dependency. A unit is a subpackage (`quota`) or a
top-level module (`app`); units of one layer may import each other, but the
units together must form no cycle.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gateway"


def layer_order() -> list[list[str]]:
    """The numbered lines of the README's Layout section (`3. `ledger`: what it holds`),
    lowest layer first."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    layers = [
        [unit.strip("` ") for unit in units.split(",")]
        for units in re.findall(r"^\d+\. ([^:]*):", section, flags=re.M)
    ]
    assert layers, "the README's Layout section lists no layers"
    return layers


def unit_of(module: str) -> str:
    """`gateway.quota.engine` -> `quota`; `gateway.app` -> `app`."""
    return module.split(".")[1]


def modules() -> Iterator[tuple[str, Path]]:
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def imports(path: Path) -> Iterator[str]:
    """The `gateway` modules a file imports, wherever in the file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "gateway":
                yield from (f"gateway.{alias.name}" for alias in node.names)
            elif node.module.startswith("gateway."):
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("gateway."))


def unit_edges() -> dict[str, dict[str, str]]:
    """unit -> {imported unit: the first importing module seen, for the message}."""
    edges: dict[str, dict[str, str]] = {}
    for module, path in modules():
        if module == "gateway":
            continue
        for imported in imports(path):
            src, dst = unit_of(module), unit_of(imported)
            if src != dst:
                edges.setdefault(src, {}).setdefault(dst, f"{module} imports {imported}")
    return edges


def test_every_unit_has_a_layer() -> None:
    placed = {unit for layer in layer_order() for unit in layer}
    units = {unit_of(m) for m, _ in modules() if m != "gateway"}
    assert units - placed == set(), "units missing from the README's layer list"
    assert placed - units == set(), "the README's layer list names units that do not exist"


def test_imports_only_go_down() -> None:
    rank = {unit: i for i, layer in enumerate(layer_order()) for unit in layer}
    upward = [
        why
        for src, targets in unit_edges().items()
        for dst, why in targets.items()
        if rank.get(dst, -1) > rank.get(src, -1)
    ]
    assert upward == []


def test_no_cycle_between_units() -> None:
    edges = unit_edges()
    cycles: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(unit: str, path: list[str]) -> None:
        state[unit] = 1
        for dst, why in edges.get(unit, {}).items():
            if state.get(dst) == 1:
                cycles.append(" -> ".join([*path[path.index(dst) :], dst]) + f" ({why})")
            elif dst not in state:
                visit(dst, [*path, dst])
        state[unit] = 2

    for unit in sorted(edges):
        if unit not in state:
            visit(unit, [unit])
    assert cycles == []
