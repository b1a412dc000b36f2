"""The import contract of vtc's layers (docs/ARCHITECTURE.md "Layers"), checked on the source.

Every module of the library belongs to one layer; a module may import modules of its own layer or
of layers below it, and the import graph (function-local imports included, so none can hide a
cycle) has no cycle. Read from the source text: nothing is imported.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

# Bottom to top; a module's layer is that of the longest listed prefix of its name ("=name": that
# module only, not the modules under it).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("vtc.state", "vtc.budget", "vtc.merge", "vtc.sequence", "vtc.grid", "vtc.sites", "vtc.options",
              "vtc.spec", "vtc.flops", "vtc.chain", "vtc.saved_module", "vtc.kernels")),
    ("methods", ("vtc.reducers",)),
    ("adapters", ("vtc.models",)),
    ("api", ("=vtc", "vtc.apply", "vtc.dymu", "vtc.holov", "vtc.answer")),
    ("tools", ("vtc.measure", "vtc.measure_vlm", "vtc.data", "vtc.train", "vtc.stats", "vtc.viz", "vtc.records",
               "vtc.shapes_benchmark", "vtc.shapes_plots", "vtc.tune", "vtc.harness", "vtc.lmms", "vtc.demo", "vtc.commands", "vtc.cli")),
)
# Package name -> source folder (pyproject.toml's package-dir).
SOURCES = {"vtc": "vtc", "vtc.models": "models", "vtc.kernels": "kernels"}


def modules(root: Path, sources: dict[str, str] = SOURCES) -> dict[str, Path]:
    """Module name -> file of every module under the source folders."""
    found: dict[str, Path] = {}
    for package, folder in sources.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(root / folder).with_suffix("").parts if p != "__init__"]
            name = ".".join([package, *parts])
            if sources.get(".".join([package, *parts[:1]]), folder) == folder:  # not a folder mapped elsewhere
                found[name] = path
    return found


def layer_of(name: str, layers=LAYERS) -> tuple[int, str] | None:
    """(index, layer name) of the longest prefix of ``name`` listed in ``layers``."""
    best = None
    for index, (layer, prefixes) in enumerate(layers):
        for prefix in prefixes:
            exact = prefix.startswith("=")
            prefix = prefix.lstrip("=")
            if (name == prefix or not exact and name.startswith(prefix + ".")) and (best is None or len(prefix) > best[2]):
                best = (index, layer, len(prefix))
    return None if best is None else best[:2]


def imports(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """The library modules ``name`` imports anywhere in its source (``from p import m`` counts
    the module ``p.m`` when it is one, else ``p``)."""
    known = set(known)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in known:
                    found.add(target)
                elif base in known:
                    found.add(base)
    found.discard(name)
    return found


def violations(root: Path, layers=LAYERS, sources: dict[str, str] = SOURCES) -> list[str]:
    """Every breach of the contract under ``root``: unassigned modules, imports of a higher
    layer, and import cycles."""
    found = modules(root, sources)
    graph = {name: imports(name, path, found) for name, path in found.items()}
    problems = []
    for name in sorted(graph):
        mine = layer_of(name, layers)
        if mine is None:
            problems.append(f"{name} belongs to no layer; add it to tests/layers.py LAYERS")
            continue
        for target in sorted(graph[name]):
            theirs = layer_of(target, layers)
            if theirs is not None and theirs[0] > mine[0]:
                problems.append(f"{name} ({mine[1]}) imports {target} ({theirs[1]}), a higher layer")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (depth-first search)."""
    cycles, done, stack, on_stack = [], set(), [], set()

    def visit(node: str) -> None:
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target in on_stack:
                loop = stack[stack.index(target):]
                start = loop.index(min(loop))  # reported from its first module by name, whatever the search order
                loop = loop[start:] + loop[:start]
                cycles.append(loop + [loop[0]])
            elif target not in done:
                visit(target)
        stack.pop()
        on_stack.discard(node)
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return cycles
