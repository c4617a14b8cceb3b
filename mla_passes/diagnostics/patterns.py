"""``mla-passes patterns``: every Inductor pattern the passes register.

Reads :func:`mla_passes.patterns.registered_patterns`: per pass, each named
pattern with what it matches and its variants (each one registered with
``torch._inductor.pattern_matcher``), printed as pattern-matcher source.
Building the listing registers the patterns (as the passes' first call does).
The anchors are patterns over the ops playing vLLM's roles; outside a vLLM
process the listing registers them over the stand-ins of
:mod:`mla_passes.testing.standins`, which have vLLM's schemas, and says so.
"""

from __future__ import annotations

import json
import sys
import textwrap

HELP = "print every registered Inductor pattern of the passes"


def add_arguments(parser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME", help="only these patterns (substring match)")
    parser.add_argument("--list", action="store_true", help="names only")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    from mla_passes.op_handles import op_handles
    from mla_passes.patterns import registered_patterns

    note = None
    if not op_handles().vllm_loaded:
        import mla_passes.testing.standins  # noqa: F401  (registers the roles)

        note = ("anchors shown over mla_passes_standin:: ops (vLLM's schemas); "
                "in a vLLM process the same patterns are registered over vllm:: ops")

    entries = [(p, r) for p, r in registered_patterns() if not args.names or any(n in r.name for n in args.names)]
    if args.names and not entries:
        print(f"mla-passes patterns: error: argument NAME: no pattern matches {args.names}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([dict(pass_name=p, name=r.name, module=r.module, doc=r.doc, variants=r.pretty())
                          for p, r in entries], indent=2))
        return 0
    if note:
        print(f"mla-passes patterns: {note}", file=sys.stderr)
    if args.list:
        for p, r in entries:
            print(f"{p}: {r.name}  ({len(r.variants)} variant{'s' if len(r.variants) != 1 else ''})")
        return 0
    for i, (p, r) in enumerate(entries):
        if i:
            print()
        print(f"=== {p}: {r.name}  ({r.module})")
        if r.doc:
            print(textwrap.indent(r.doc, "# "))
        for j, code in enumerate(r.pretty(), 1):
            print(f"--- variant {j}")
            print(code)
    n = sum(len(r.variants) for _, r in entries)
    print(f"\n{len(entries)} pattern{'s' if len(entries) != 1 else ''}, {n} registered variant{'s' if n != 1 else ''}")
    return 0
