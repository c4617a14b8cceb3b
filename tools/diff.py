"""``mla-passes diff A B``: what a rewrite changed, graph by graph.

A and B are two depyf dump folders (``mla-passes dump``) or two graph files.
Graphs are paired by name across depyf's naming schemes; for each pair that
differs it prints an op-count table per target (ops inside
``auto_functionalized`` counted as the op) and a unified diff of the
normalized text. Graphs present on one side only are listed. Logic:
:mod:`mla_passes.tools.graphdiff`. Exit status as diff(1): 0 same, 1 different,
2 trouble.
"""

from __future__ import annotations

import json
import sys

from .argtypes import nonnegative_int, usage_error

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


def run(args) -> int:
    from pathlib import Path

    from .graphdiff import compare_paths, format_report

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
