"""``mla-passes patterns``: every pattern the passes register, and what
replaces it, as readable FX code.

Reads the registry :func:`mla_passes.patterns.all_patterns` (one entry per
(pattern, replacement) pair of each pattern module). The passes match
procedurally (RoPE semantically); the pairs state what they match and emit.
"""

from __future__ import annotations

import json
import sys
import textwrap

HELP = "print every registered pattern and its replacement as FX code"


def add_arguments(parser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME", help="only these patterns (substring match)")
    parser.add_argument("--list", action="store_true", help="names only")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def readable(code: str) -> str:
    """FX code without the ``;  x = y = None`` tails (they only free memory)."""
    from mla_passes.graph_files import _NONE_TAIL

    return "\n".join(_NONE_TAIL.sub("", line) for line in code.splitlines())


def run(args) -> int:
    from mla_passes.patterns import all_patterns

    entries = [e for e in all_patterns() if not args.names or any(n in e.name for n in args.names)]
    if args.names and not entries:
        print(f"mla-passes patterns: no pattern matches {args.names}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([dict(name=e.name, module=e.module, doc=e.doc, pattern=e.pattern_code,
                               replacement=e.replacement_code) for e in entries], indent=2))
        return 0
    if args.list:
        for e in entries:
            print(f"{e.name}  ({e.module})")
        return 0
    for i, e in enumerate(entries):
        if i:
            print()
        print(f"=== {e.name}  ({e.module})")
        if e.doc:
            print(textwrap.indent(e.doc, "# "))
        print("--- pattern")
        print(readable(e.pattern_code))
        print("--- replacement")
        print(readable(e.replacement_code))
    print(f"\n{len(entries)} pattern{'s' if len(entries) != 1 else ''}")
    return 0
