"""The package's import graph from every import in the code, module level and inside functions.

    python tools/import_graph.py [--level module|package|room] [--json]

Reads the source (nothing is imported): ``mla_passes/``, plus ``patterns/`` under the name it is
installed as (``mla_passes.patterns``) and ``tools/`` (not installed) as ``tools``. Prints the edge
count (how many of them are imports inside a function), every cycle (strongly connected set of
two or more modules or packages) and every import running up the layers (:data:`LAYERS`), and
exits 1 if there is either. A module-level drawing misses the
arrows of imports inside functions; this one does not.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"mla_passes": ROOT / "mla_passes", "mla_passes.patterns": ROOT / "patterns", "tools": ROOT / "tools"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    found: dict[str, Path] = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            name = ".".join((prefix, *rel))
            if name.startswith("mla_passes.") and name.split(".")[1] == "patterns" and prefix == "mla_passes":
                continue  # installed from the top-level folders, not mla_passes/ (none there today)
            found[name] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies inside."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def edges(known: dict[str, Path]) -> list[tuple[str, str, bool]]:
    """(importer, imported, inside a function) for every import of a package module."""
    out = []
    for mod, path in known.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        nested: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                nested.update(id(n) for n in ast.walk(node) if n is not node)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for t in targets:
                dst = _resolve(t, known)
                # importing a.b.c runs a/__init__ and a/b/__init__ first: those are imports too,
                # except of the importer's own parent packages (already running when it runs)
                while dst:
                    if dst != mod and not mod.startswith(dst + "."):
                        out.append((mod, dst, id(node) in nested))
                    dst = _resolve(dst.rpartition(".")[0], known) if "." in dst else None
    return sorted(set(out))


def package_of(mod: str, known: dict[str, Path]) -> str:
    """The module's package (a package's own __init__ is the package)."""
    return mod if known[mod].name == "__init__.py" else mod.rpartition(".")[0]


def cycles(nodes: set[str], graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of two or more nodes (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def room_of(mod: str) -> str:
    """A file at the top of ``mla_passes/`` or a folder under it (``tools/`` is one): the rooms of a
    drawing by folders."""
    parts = mod.split(".")
    if parts[0] != "mla_passes" or len(parts) == 1:
        return parts[0]
    return ".".join(parts[:2])


def graph_at(level: str, known: dict[str, Path], es) -> tuple[set[str], dict[str, set[str]], int]:
    """``module``: every module a node. ``package``: a package holds its modules and subpackages'
    edges to it (so a top-level module and a subpackage are not told apart). ``room``: each file at
    the top of mla_passes/ and each folder under it a node, as a drawing by folders shows them."""
    nodes, graph, n = set(), {}, 0
    for a, b, _ in es:
        if level == "package":
            a, b = package_of(a, known), package_of(b, known)
            if a == b or b.startswith(a + ".") or a.startswith(b + "."):
                continue  # a package and its own subpackages: the parent holds them
        elif level == "room":
            a, b = room_of(a), room_of(b)
            if a == b:
                continue
        nodes.update((a, b))
        if b not in graph.setdefault(a, set()):
            graph[a].add(b)
            n += 1
    return nodes, graph, n


# The layers, lowest first (CONTRIBUTING "Layout"): an import runs to its own layer or a lower one.
# Modules of mla_passes not named here are the core; tools/ (not installed) sits on top.
LAYERS = {"mla_passes.kernels": 0, "mla_passes.testing": 2, "mla_passes.diagnostics": 3, "mla_passes.bench": 4,
          "mla_passes.cli": 5, "tools": 6}
CORE = 1


def layer_of(mod: str) -> int:
    for prefix, n in LAYERS.items():
        if mod == prefix or mod.startswith(prefix + "."):
            return n
    return CORE


def upward(es) -> list[tuple[str, str]]:
    """(importer, imported) where the imported module sits on a higher layer."""
    return [(a, b) for a, b, _ in es if layer_of(b) > layer_of(a)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--level", choices=("module", "package", "room"), default="module")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    known = modules()
    es = edges(known)
    nodes, graph, n = graph_at(args.level, known, es)
    found = cycles(nodes, graph)
    inside = sum(1 for *_, nested in es if nested)
    up = upward(es)
    summary = {"modules": len(known), "level": args.level, "edges": n, "module_edges": len(es),
               "imports_inside_functions": inside, "cycles": found, "upward": up}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{len(known)} modules; {len(es)} module-to-module imports, {inside} of them inside a function; "
              f"{args.level} level: {len(nodes)} nodes, {n} edges, {len(found)} cycle(s); "
              f"{len(up)} import(s) running up the layers")
        for a, b in up:
            print(f"  up: {a} (layer {layer_of(a)}) -> {b} (layer {layer_of(b)})")
        for c in found:
            print("  cycle: " + " <-> ".join(c))
            for a in c:
                print(f"    {a} -> " + ", ".join(b for b in sorted(graph[a]) if b in c))
    return 1 if found or up else 0


if __name__ == "__main__":
    sys.exit(main())
