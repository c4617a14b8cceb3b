"""``mla-passes lint``: flag what breaks CUDA-graph capture in dumped graphs.

Checks one graph file or every graph file of a depyf dump folder with
:mod:`mla_passes.lint` (data-dependent output shapes, host syncs, fake output
shapes that depend on more than the inputs' shapes). Exit status: 0 clean,
1 findings, 2 bad input.
"""

from __future__ import annotations

import json
import sys

HELP = "flag ops that break CUDA-graph capture (dynamic shapes, host syncs) in a dumped graph or dump folder"


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="DUMP_OR_GRAPH",
                        help="a graph file (print_readable / depyf) or a depyf dump folder")
    parser.add_argument("--stage", default=None,
                        help="in dump folders, only files whose name contains STAGE (e.g. AFTER_POST_GRAD)")
    parser.add_argument("--json", action="store_true", help="print findings as JSON")


def run(args) -> int:
    from pathlib import Path

    from mla_passes.lint import lint_path

    results: dict[str, list] = {}
    for p in args.paths:
        if not Path(p).exists():
            print(f"mla-passes lint: error: argument DUMP_OR_GRAPH: {p}: no such file or folder", file=sys.stderr)
            return 2
        try:
            found = lint_path(p)
        except (ValueError, UnicodeDecodeError) as e:
            print(f"mla-passes lint: {e}", file=sys.stderr)
            return 2
        for f, findings in found.items():
            if args.stage is None or args.stage in Path(f).name:
                results[f] = findings
    if not results:  # nothing linted is not "clean"
        where = " ".join(args.paths)
        if args.stage is not None:
            print(f"mla-passes lint: error: argument --stage: {args.stage!r} matches no graph file in {where}",
                  file=sys.stderr)
        else:
            print(f"mla-passes lint: error: argument DUMP_OR_GRAPH: no graph file in {where}", file=sys.stderr)
        return 2
    n = sum(len(v) for v in results.values())
    if args.json:
        print(json.dumps({
            "files": {f: [vars(x) for x in v] for f, v in results.items()},
            "num_files": len(results), "num_findings": n,
        }, indent=2))
    else:
        for f, findings in results.items():
            for x in findings:
                print(f"{f}: {x}")
        print(f"{n} finding{'s' if n != 1 else ''} in {len(results)} graph file{'s' if len(results) != 1 else ''}")
    return 1 if n else 0
