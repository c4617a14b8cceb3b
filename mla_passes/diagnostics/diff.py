"""``mla-passes diff A B``: what a rewrite changed, graph by graph.

A and B are two depyf dump folders (``mla-passes dump``) or two graph files.
Graphs are paired by name across depyf's naming schemes; for each pair that
differs it prints an op-count table per target (ops inside
``auto_functionalized`` counted as the op) and a unified diff of the
normalized text. Graphs present on one side only are listed. Exit status as
diff(1): 0 same, 1 different, 2 trouble.

Parsing, normalizing and pairing graph files live in
:mod:`.graph_files` (shared with the lint and the dump); this module compares
paired graphs (op counts per target, then a unified diff of the normalized
text) and formats the report.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import os
import sys
from pathlib import Path

from .argtypes import nonnegative_int, usage_error
from .graph_files import GraphKey, collect_graph_files, normalize_graph_source, parse_graph_source

HELP = "compare two depyf dump folders or two graph files: op counts per target, then a unified diff"


def add_arguments(parser) -> None:
    parser.add_argument("a", metavar="A", help="dump folder or graph file (before)")
    parser.add_argument("b", metavar="B", help="dump folder or graph file (after)")
    parser.add_argument("--stage", default=None,
                        help="only graphs whose stage name contains STAGE (e.g. AFTER_POST_GRAD, mla_passes_)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--all-ops", action="store_true", help="list unchanged targets in the op tables too")
    parser.add_argument("--no-text", action="store_true", help="op tables only, no text diff")
    parser.add_argument("-U", "--context", type=nonnegative_int, default=3,
                        help="lines of context in the text diff (default 3)")
    parser.add_argument("--show-identical", action="store_true", help="also list graphs that are identical")



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


# --- the command ----------------------------------------------------------------

def run(args) -> int:
    for name, path in (("A", args.a), ("B", args.b)):
        if not Path(path).exists():
            return usage_error("diff", name, f"{path}: no such file or folder")
    try:
        pairs = compare_paths(args.a, args.b, stage=args.stage, context=args.context)
    except (ValueError, OSError) as e:
        print(f"mla-passes diff: {e}", file=sys.stderr)
        return 2
    if not pairs:  # nothing compared is not "the same"
        if args.stage is not None:
            return usage_error("diff", "--stage", f"{args.stage!r} matches no graph in {args.a} or {args.b}")
        print(f"mla-passes diff: no graph files in {args.a} or {args.b}", file=sys.stderr)
        return 2
    if args.json:
        counts = {s: sum(p.status == s for p in pairs) for s in ("changed", "identical", "only_a", "only_b")}
        print(json.dumps({"a": args.a, "b": args.b, "summary": counts,
                          "graphs": [p.to_json() for p in pairs]}, indent=2))
    else:
        sys.stdout.write(format_report(pairs, all_ops=args.all_ops, show_identical=args.show_identical,
                                       text_diff=not args.no_text))
    return 0 if all(p.status == "identical" for p in pairs) else 1
