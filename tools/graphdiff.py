"""Compare FX graph dumps: the library behind ``mla-passes diff``.

Parsing, normalizing and pairing graph files live in
:mod:`mla_passes.graph_files` (shared with the lint); this module compares
paired graphs (op counts per target, then a unified diff of the normalized
text) and formats the report.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import os
from pathlib import Path

from mla_passes.graph_files import (  # noqa: F401  (re-exported for the CLI and tests)
    _NONE_TAIL,
    GraphKey,
    GraphNode,
    ParsedGraph,
    collect_graph_files,
    is_graph_source,
    normalize_graph_source,
    parse_graph_file,
    parse_graph_source,
)

# --- comparing ---------------------------------------------------------------

@dataclasses.dataclass
class GraphPair:
    key: str
    a: str | None
    b: str | None
    status: str                      # "identical" | "changed" | "only_a" | "only_b"
    op_counts: dict[str, tuple[int, int]]
    diff: str = ""

    def changed_ops(self) -> dict[str, int]:
        """target -> count(B) - count(A), for targets whose count differs."""
        return {t: b - a for t, (a, b) in self.op_counts.items() if a != b}

    def to_json(self) -> dict:
        return {
            "key": self.key, "a": self.a, "b": self.b, "status": self.status,
            "op_counts": {t: {"a": a, "b": b, "delta": b - a} for t, (a, b) in sorted(self.op_counts.items())},
            "diff": self.diff,
        }


def compare_graph_sources(src_a: str | None, src_b: str | None, key: str, path_a=None, path_b=None,
                          *, context: int = 3) -> GraphPair:
    ca = parse_graph_source(src_a).op_counts() if src_a is not None else collections.Counter()
    cb = parse_graph_source(src_b).op_counts() if src_b is not None else collections.Counter()
    counts = {t: (ca.get(t, 0), cb.get(t, 0)) for t in sorted(set(ca) | set(cb))}
    if src_a is None or src_b is None:
        return GraphPair(key, path_a, path_b, "only_b" if src_a is None else "only_a", counts)
    na, nb = normalize_graph_source(src_a), normalize_graph_source(src_b)
    if na == nb:
        return GraphPair(key, path_a, path_b, "identical", counts)
    diff = "".join(difflib.unified_diff(
        na.splitlines(keepends=True), nb.splitlines(keepends=True),
        fromfile=f"a/{key}", tofile=f"b/{key}", n=context,
    ))
    return GraphPair(key, path_a, path_b, "changed", counts, diff)


def compare_paths(a: str | os.PathLike, b: str | os.PathLike, *, stage: str | None = None,
                  context: int = 3) -> list[GraphPair]:
    """Compare two dump folders (pair files by :class:`GraphKey`) or two graph
    files. ``stage`` keeps only keys whose stage contains it."""
    a, b = Path(a), Path(b)
    if a.is_file() and b.is_file():
        return [compare_graph_sources(a.read_text(), b.read_text(), f"{a.name} <> {b.name}", str(a), str(b),
                                      context=context)]
    if not (a.is_dir() and b.is_dir()):
        raise ValueError(f"diff: A and B must both be dump folders or both graph files, got {a} and {b}")
    ga, gb = collect_graph_files(a), collect_graph_files(b)
    keys = sorted(set(ga) | set(gb), key=lambda k: (k.fn, k.stage, k.k))
    pairs = []
    for key in keys:
        if stage is not None and stage not in key.stage:
            continue
        pa, pb = ga.get(key), gb.get(key)
        pairs.append(compare_graph_sources(
            pa.read_text() if pa else None, pb.read_text() if pb else None, str(key),
            str(pa) if pa else None, str(pb) if pb else None, context=context,
        ))
    return pairs


def format_op_table(pair: GraphPair, *, all_ops: bool = False) -> str:
    rows = [(t, a, b) for t, (a, b) in pair.op_counts.items() if all_ops or a != b]
    if not rows:
        return "  (op counts equal)\n"
    w = max(len("target"), *(len(t) for t, _, _ in rows))
    out = [f"  {'target':<{w}}  {'A':>5}  {'B':>5}  {'B-A':>5}\n"]
    for t, a, b in rows:
        d = b - a
        out.append(f"  {t:<{w}}  {a:>5}  {b:>5}  {(f'{d:+d}' if d else '0'):>5}\n")
    return "".join(out)


def format_report(pairs: list[GraphPair], *, all_ops: bool = False, show_identical: bool = False,
                  text_diff: bool = True) -> str:
    out = []
    for p in pairs:
        if p.status == "identical":
            if show_identical:
                out.append(f"== {p.key}: identical\n")
            continue
        if p.status in ("only_a", "only_b"):
            side, path = ("A", p.a) if p.status == "only_a" else ("B", p.b)
            out.append(f"== {p.key}: only in {side} ({path})\n")
            continue
        out.append(f"== {p.key}: changed\n")
        out.append(format_op_table(p, all_ops=all_ops))
        if text_diff:
            out.append(p.diff)
    counts = collections.Counter(p.status for p in pairs)
    out.append(
        f"-- {len(pairs)} graph{'' if len(pairs) == 1 else 's'}: {counts['changed']} changed, {counts['identical']} identical, "
        f"{counts['only_a']} only in A, {counts['only_b']} only in B\n"
    )
    return "".join(out)
