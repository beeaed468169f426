"""How the package is layered. The command line sits on top and calls the reproductions (`calm.experiments`),
which call the library. Nothing imports a layer above its own, and no module imports itself through others.

Every import statement counts, including one inside a function or under `if TYPE_CHECKING:`. A cycle that is
hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"
CLI = {"calm.cli", "calm.train.__main__"}  # `calm ...` and `python -m calm.train ...`
REPRODUCTIONS = "calm.experiments"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted((SRC / "calm").rglob("*.py"))}


def imported_modules(name: str) -> set[str]:
    """The calm modules that module `name` imports, anywhere in its source."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from ..data import x` in calm.train.run is calm.data
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module
            # `from calm import serve` imports the module calm.serve; `from calm.data import pad`, calm.data.
            found |= {f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
                      for alias in node.names}
    return {m for m in found if m in MODULES} - {name}


GRAPH = {name: imported_modules(name) for name in MODULES}


def layer(name: str) -> int:
    if name in CLI:
        return 2
    if name == REPRODUCTIONS or name.startswith(REPRODUCTIONS + "."):
        return 1
    return 0


def test_the_graph_sees_every_kind_of_import():
    assert {"calm.train", "calm.data", "calm.serve", "calm.experiments.kv_reproduce"} <= GRAPH["calm.cli"]
    assert {"calm.data", "calm.model", "calm.train.options"} <= GRAPH["calm.train.run"]  # relative, two levels
    assert "calm.tasks.translation" in GRAPH["calm.experiments.translation"]  # `from calm.tasks import translation`
    assert "calm" in GRAPH["calm.experiments.kv_reproduce"]  # `import calm`


def test_only_the_command_line_imports_the_command_line():
    importers = sorted(name for name, imported in GRAPH.items() if imported & CLI and name not in CLI)
    assert importers == [], f"library modules import the CLI: {importers}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_layer_above_its_own(name):
    above = sorted(m for m in GRAPH[name] if layer(m) > layer(name))
    assert above == [], f"{name} imports {above}, which sit above it"


def test_the_import_graph_has_no_cycle():
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(name):], name]))
        if name in done:
            return
        for imported in sorted(GRAPH[name]):
            visit(imported, [*path, name])
        done.add(name)

    for name in sorted(GRAPH):
        visit(name, [])
