"""The layers of DESIGN.md hold in the source: imports point down and never go round in a cycle.

Every module under src/swarmlm is parsed with `ast`, never imported, and each of its imports of
swarmlm (at module level or inside a function, under `if TYPE_CHECKING:` too, absolute or
relative) becomes an edge to the module it names: `from swarmlm.p2p import keys` is an edge to
`swarmlm.p2p.keys`, `from swarmlm.p2p.peer import Peer` one to `swarmlm.p2p.peer`. A package's
`__init__` that Python runs on the way counts for nothing, so `p2p/__init__.py` listing its
modules does not make a cycle with them. An import under `if TYPE_CHECKING:` must respect the
layers like any other, but is left out of the cycle check: it never runs, and it is how a module
names a type of a module that imports it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
ROOT = "swarmlm"

# Lowest first. A module may import any module of its own top-level package or of a lower layer.
# Packages of one layer are siblings and import each other only where SIDEWAYS allows it; a name
# with no code yet (privacy, ledger, api, ...) simply has no modules.
LAYERS: list[set[str]] = [
    {"swarmlm", "errors", "serialize", "log", "compact", "base58", "web", "heap"},   # leaves; "swarmlm" is the package's __init__
    {"model"},
    {"data", "train"},
    {"parallel"},
    {"p2p"},
    {"store"},
    {"swarm", "collab", "privacy", "ledger"},                # the four services: none imports another
    {"api", "dashboard", "sim"},
    {"cli", "demo", "__main__"},                             # entry points: nothing below imports them
]
LEAVES = LAYERS[0]
SIDEWAYS: set[tuple[str, str]] = (
    {(a, b) for a in LEAVES for b in LEAVES}                 # leaf -> leaf, as long as it makes no cycle
    | {("train", "data"),                                    # the training loop reads corpora and shards
       ("cli", "demo"),                                      # `swarmlm demo`
       ("__main__", "cli")}                                  # `python -m swarmlm`
)


@dataclass(frozen=True)
class Edge:
    src: str        # importing module, e.g. swarmlm.train.loop
    dst: str        # imported module, e.g. swarmlm.parallel.launch
    line: int       # where in src
    typing_only: bool = False   # under `if TYPE_CHECKING:`: never runs

    def __str__(self) -> str:
        return f"{self.src} (line {self.line}) imports {self.dst}"


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under src/swarmlm (a package is its __init__)."""
    out = {}
    for path in sorted((src / ROOT).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def resolve(name: str, files: dict[str, Path]) -> str | None:
    """The module a dotted name refers to: itself, or the closest enclosing module we have."""
    while name and name not in files:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, files: dict[str, Path]) -> list[Edge]:
    tree = ast.parse(files[module].read_text(encoding="utf-8"), filename=str(files[module]))
    package = module if is_package(module, files) else module.rpartition(".")[0]
    edges = []
    for node, typing_only in _import_nodes(tree.body, False):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:                                   # relative: from .x import y
                base_parts = package.split(".")
                base = ".".join(base_parts[:len(base_parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
        for target in targets:
            if target != ROOT and not target.startswith(ROOT + "."):
                continue
            dst = resolve(target, files)
            if dst is not None and dst != module:
                edges.append(Edge(module, dst, node.lineno, typing_only))
    return edges


def _import_nodes(nodes, typing_only: bool):
    """Every Import/ImportFrom in or below `nodes`, each with whether it sits under `if TYPE_CHECKING:`."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, typing_only
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_nodes(node.body, True)
            yield from _import_nodes(node.orelse, typing_only)
        else:
            yield from _import_nodes(ast.iter_child_nodes(node), typing_only)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph(files: dict[str, Path]) -> dict[str, list[Edge]]:
    return {m: imports_of(m, files) for m in files}


def unit_of(module: str) -> str:
    """The top-level piece a module belongs to: swarmlm.p2p.peer -> p2p, swarmlm.cli -> cli."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def layer_of(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise KeyError(unit)


def layer_violations(graph: dict[str, list[Edge]]) -> list[str]:
    out = []
    for edges in graph.values():
        for e in edges:
            a, b = unit_of(e.src), unit_of(e.dst)
            if a == b:
                continue
            la, lb = layer_of(a), layer_of(b)
            if lb == len(LAYERS) - 1 and (a, b) not in SIDEWAYS:
                out.append(f"{e}: nothing imports {b}, an entry point")
            elif lb > la:
                out.append(f"{e}: {a} (layer {la}) imports upward into {b} (layer {lb})")
            elif lb == la and (a, b) not in SIDEWAYS:
                out.append(f"{e}: {a} and {b} are siblings in one layer and must not import each other")
    return out


def cycles(graph: dict[str, list[Edge]]) -> list[tuple[list[str], list[Edge]]]:
    """(its modules, one cycle through them as edges) per strongly connected component of more than one module (Tarjan),
    over the imports that run (not those under `if TYPE_CHECKING:`)."""
    graph = {m: [e for e in edges if not e.typing_only] for m, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:      # recursion depth is bounded by the number of modules (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph[v]:
            if e.dst not in index:
                visit(e.dst)
                low[v] = min(low[v], low[e.dst])
            elif e.dst in on_stack:
                low[v] = min(low[v], index[e.dst])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(c, _cycle_through(c[0], set(c), graph)) for c in components]


def _cycle_through(start: str, members: set[str], graph: dict[str, list[Edge]]) -> list[Edge]:
    """The shortest path of edges from `start` back to itself inside one component (breadth first)."""
    came_by: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for e in graph[v]:
                if e.dst not in members:
                    continue
                if e.dst == start:
                    path = [e]
                    while path[0].src != start:
                        path.insert(0, came_by[path[0].src])
                    return path
                if e.dst not in came_by:
                    came_by[e.dst] = e
                    nxt.append(e.dst)
        frontier = nxt
    raise AssertionError(f"{start} is in a component but on no cycle")


def describe_cycle(component: list[str], path: list[Edge]) -> str:
    text = "import cycle: " + " -> ".join(f"{e.src} (line {e.line})" for e in path) + f" -> {path[0].src}"
    if len(component) > len(path):
        text += f"\n  (one of the cycles among {', '.join(component)})"
    return text


# ---- the source tree --------------------------------------------------------------------------

def test_every_top_level_piece_has_a_layer():
    files = module_files()
    unknown = sorted({unit_of(m) for m in files} - set().union(*LAYERS))
    assert not unknown, f"not in any layer of DESIGN.md (add them to LAYERS here and there): {unknown}"


def test_no_module_imports_a_higher_layer_or_a_sibling():
    problems = layer_violations(import_graph(module_files()))
    assert not problems, "imports against the layers of DESIGN.md:\n" + "\n".join(problems)


def test_no_import_cycles_between_modules():
    found = cycles(import_graph(module_files()))
    assert not found, "\n".join(describe_cycle(*c) for c in found)


# ---- the checker itself, on a made-up tree ----------------------------------------------------

def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = tmp_path / ROOT / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return module_files(tmp_path)


def test_checker_sees_function_level_and_relative_imports_in_a_cycle(tmp_path):
    files = _tree(tmp_path, {
        "__init__.py": "",
        "train/__init__.py": "",
        "train/loop.py": "def f():\n    from swarmlm.parallel.launch import run\n",
        "parallel/__init__.py": "",
        "parallel/launch.py": "from ..train import loop\n",
    })
    found = cycles(import_graph(files))
    assert [describe_cycle(*c) for c in found] == [
        "import cycle: swarmlm.parallel.launch (line 1) -> swarmlm.train.loop (line 2) -> swarmlm.parallel.launch"]


def test_checker_names_upward_and_sideways_imports(tmp_path):
    files = _tree(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "model/__init__.py": "from swarmlm import errors\n",
        "model/hf.py": "import swarmlm.store.cid\n",
        "store/__init__.py": "",
        "store/cid.py": "",
        "swarm/__init__.py": "",
        "swarm/wire.py": "from swarmlm.collab import state\n",
        "collab/__init__.py": "",
        "collab/state.py": "from swarmlm.store.cid import CID\n",
        "cli.py": "from swarmlm.demo import run_demo\n",
        "demo/__init__.py": "",
        "demo/swarm.py": "def f():\n    from swarmlm import cli\n",
    })
    assert sorted(layer_violations(import_graph(files))) == [
        "swarmlm.demo.swarm (line 2) imports swarmlm.cli: nothing imports cli, an entry point",
        "swarmlm.model.hf (line 1) imports swarmlm.store.cid: model (layer 1) imports upward into store (layer 5)",
        "swarmlm.swarm.wire (line 1) imports swarmlm.collab.state: "
        "swarm and collab are siblings in one layer and must not import each other",
    ]
