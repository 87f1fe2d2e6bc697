"""The import graph of emailpers/: the stages after the fetch never import the
fetch layer (data flows one way: recipients -> sources -> render -> output ->
report), and no module reaches itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "emailpers"
FETCH_LAYER = {"fetch", "urls", "pacing", "http", "auth", "cache", "jsondata"}


def runtime_imports(module: str) -> set[str]:
    """The emailpers modules `module` imports when it runs (not those only
    a type checker reads, under `if TYPE_CHECKING:`)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "emailpers":
                parts = child.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in child.names])
            elif isinstance(child, ast.Import):
                found.update(a.name.split(".")[1] for a in child.names if a.name.startswith("emailpers."))
            visit(child)

    visit(ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8")))
    return {name for name in found if (PACKAGE / f"{name}.py").exists()} - {module}


def reachable(module: str) -> set[str]:
    seen, pending = set(), [module]
    while pending:
        for name in runtime_imports(pending.pop()):
            if name not in seen:
                seen.add(name)
                pending.append(name)
    return seen


@pytest.mark.parametrize("module", ["report", "manifest", "output", "outcome", "tally", "compose"])
def test_the_stages_after_the_fetch_do_not_reach_back_into_it(module: str) -> None:
    assert reachable(module) & FETCH_LAYER == set(), f"{module}.py imports the fetch layer"


def test_the_graph_has_no_cycle() -> None:
    modules = [p.stem for p in PACKAGE.glob("*.py")]
    for module in modules:
        assert module not in reachable(module), f"{module}.py imports itself through {sorted(reachable(module))}"
