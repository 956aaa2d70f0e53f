"""The package's layout holds: no import loop, and no import that runs back up the layers.

Layers, lowest first; a module may import its own layer and those below, never one above (a lazy import inside a
function counts too: it is the same dependency, only later). The lazy package face (`lowrank_rlhf/__init__.py`)
names its modules by string and is left out.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lowrank_rlhf"
LAYERS = [
    ("config", "recipes"),
    ("data",),
    ("run",),
    ("rewards",),
    ("models",),
    ("memory",),
    ("rl",),
    ("stages",),
    ("pipeline",),
    ("commands", "serve"),
    ("bench",),
    ("cli", "__main__"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
MAX_LINES = 420


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def scan(root: Path) -> tuple[dict[str, Path], dict[str, set[str]]]:
    """The package's modules (but its lazy face) and, for each, the package modules it imports."""
    modules = {module_name(p, root): p for p in root.rglob("*.py") if p.name != "__init__.py" or p.parent != root}
    return modules, {name: imports_of(name, path, modules) for name, path in modules.items()}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every lowrank_rlhf module `name` imports, wherever the import statement stands."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lowrank_rlhf")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            if not base.startswith("lowrank_rlhf"):
                continue
            for alias in node.names:  # `from pkg import module` imports that module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def layer(name: str) -> int:
    top = name.split(".")[1]
    assert top in RANK, f"{name}: its top-level name {top!r} is in no layer of tests/test_layout.py"
    return RANK[top]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) > layer(a))


def import_loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components; any component of two or more modules is a loop."""
    index, low, stack, on_stack, loops, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return loops


MODULES, GRAPH = scan(PACKAGE)


def test_every_module_is_in_a_layer():
    for name in MODULES:
        layer(name)


def test_no_import_runs_back_up_the_layers():
    assert not upward_imports(GRAPH), "imports that run back up:\n" + "\n".join(upward_imports(GRAPH))


def test_no_import_loop():
    assert not import_loops(GRAPH), f"import loops: {import_loops(GRAPH)}"


def test_the_checks_see_an_upward_import_and_a_loop(tmp_path):
    """On a small fake package: data imports rl (upward), and two data modules import each other (a loop)."""
    root = tmp_path / "lowrank_rlhf"
    for folder in ("data", "rl"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "rl" / "trainer.py").write_text("from ..data import tables\n")
    (root / "data" / "tables.py").write_text("def read():\n    from ..rl import trainer\n")  # lazy, still counts
    (root / "data" / "chat.py").write_text("from .errors import DataError\n")
    (root / "data" / "errors.py").write_text("from . import chat\n")
    _, graph = scan(root)
    assert upward_imports(graph) == ["lowrank_rlhf.data.tables -> lowrank_rlhf.rl.trainer"]
    assert sorted(import_loops(graph)) == [["lowrank_rlhf.data.chat", "lowrank_rlhf.data.errors"],
                                           ["lowrank_rlhf.data.tables", "lowrank_rlhf.rl.trainer"]]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_too_long(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by job (limit {MAX_LINES})"
