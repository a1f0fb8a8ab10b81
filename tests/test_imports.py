"""Imports flow one way (CLI -> stages -> core): no module imports one that imports it back, not even
inside a function body, where a loop hides until the day both are loaded from the other end.

Packages are layered too: at every level of the package tree the graph between siblings (a
package stands for every module under it) has no loop, and a stage package reaches (directly or
through other modules) only the packages of the layers below its own (``LAYERS``): never one above
it nor one beside it.  ``surface`` and ``curvature`` are peers: what both need lives below them
(``direction_file``, ``models``, ``fisher.subsets``), and ``direction_kinds``, above both, is the
one module that combines them.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "landscape"

# The subpackages of landscape, top layer first; packages in one layer are peers.
LAYERS = [["cli"], ["guided"], ["plots"], ["surface", "curvature"], ["fisher", "testing"], ["data"]]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set) -> set:
    """landscape modules that ``path`` imports anywhere in its body (``from . import x`` counts x)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _graph():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) for p in paths}


def _cycle(graph):
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_core_modules_do_not_import_stages_or_the_command_line():
    graph = _graph()
    core = ("landscape.errors", "landscape.files", "landscape.runtime", "landscape.datahome", "landscape.defaults")
    for module in core:
        assert not {m for m in graph[module] if m.startswith("landscape.cli")}, module
    assert not any(m.startswith("landscape.cli") for name, deps in graph.items()
                   if not name.startswith("landscape.cli") for m in deps), "a library module imports the CLI"


def _collapsed(graph, depth):
    """The graph between module names cut to their first ``depth`` parts (a package for all under it)."""
    def cut(name):
        return ".".join(name.split(".")[:depth])
    out = {}
    for name, deps in graph.items():
        out.setdefault(cut(name), set()).update(cut(d) for d in deps if cut(d) != cut(name))
    return out


def test_no_package_loop_at_any_level():
    graph = _graph()
    deepest = max(name.count(".") + 1 for name in graph)
    for depth in range(2, deepest + 1):
        cycle = _cycle(_collapsed(graph, depth))
        assert cycle is None, f"package import loop: {' -> '.join(cycle)}"


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_stage_packages_reach_only_the_layers_below_them():
    top = _collapsed(_graph(), 2)
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == {name for layer in LAYERS for name in layer}, "place every package in LAYERS"
    layer_of = {f"landscape.{name}": i for i, layer in enumerate(LAYERS) for name in layer}
    for package, level in layer_of.items():
        wrong = sorted(p for p in _reachable(top, package) if p in layer_of and layer_of[p] <= level and p != package)
        assert not wrong, f"{package} imports (through any module) {wrong}, above or beside it"


def test_the_layer_check_sees_an_import_between_peers():
    graph = {"landscape.surface.a": {"landscape.direction_kinds"},
             "landscape.direction_kinds": {"landscape.curvature.b"}, "landscape.curvature.b": set()}
    assert "landscape.curvature" in _reachable(_collapsed(graph, 2), "landscape.surface")
    assert _cycle(_collapsed({"landscape.surface.a": {"landscape.curvature.b"},
                              "landscape.curvature.b": {"landscape.surface.c"}}, 2)) is not None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
