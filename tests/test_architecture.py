"""The package's shape: its import graph (every ``import`` of a latentmap module, at the top of a
module or inside a function) has no cycle, so the modules stack in layers and nothing imports a
module that imports it back."""

from __future__ import annotations

import ast

from helpers import ROOT

PACKAGE = ROOT / "src" / "latentmap"


def import_graph() -> dict[str, set[str]]:
    """``{module: the latentmap modules it imports}``; a package's ``__init__`` is the package."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def known(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in modules else ""

    graph = {}
    for module, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("latentmap"):
                found |= {known(f"{node.module}.{alias.name}") or known(node.module) for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {known(alias.name) for alias in node.names if alias.name.startswith("latentmap")}
        # a package may import its own parts; a module never itself
        graph[module] = {name for name in found if name and name != module and not name.startswith(module + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def layers(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's layer: 0 imports no latentmap module, n imports only layers below n."""
    depth: dict[str, int] = {}

    def of(module: str) -> int:
        if module not in depth:
            depth[module] = 1 + max((of(target) for target in graph[module]), default=-1)
        return depth[module]

    for module in graph:
        of(module)
    return depth


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "latentmap.settings" in graph
    assert cycles(graph) == []


def test_the_check_finds_a_cycle_and_the_layers_are_ordered():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    graph = import_graph()
    depth = layers(graph)
    assert all(depth[target] < depth[module] for module, targets in graph.items() for target in targets)
    # the foundations import nothing of latentmap; the commands sit on top of what they run
    assert depth["latentmap.errors"] == 0 and depth["latentmap.settings"] < depth["latentmap.data"]
    assert depth["latentmap.commands.similarity"] > depth["latentmap.task"] > depth["latentmap.settings"]
