"""The ``mla-passes`` command line.

Each subcommand is a module that defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``: the diagnostics in
:mod:`mla_passes.diagnostics`, one module per command (demo, dump, diff,
report, patterns, lint), and the benchmarks in :mod:`mla_passes.bench`
(``bench``: :mod:`~mla_passes.bench.kernel`, ``bench-step``:
:mod:`~mla_passes.bench.step`). This module sits above both and nothing in
the package imports it.
"""

from __future__ import annotations

import argparse
import sys

from .bench import kernel as bench, step as bench_step
from .diagnostics import demo, diff, dump, lint, patterns, report

COMMANDS = {
    "demo": demo,
    "dump": dump,
    "diff": diff,
    "report": report,
    "patterns": patterns,
    "lint": lint,
    "bench": bench,
    "bench-step": bench_step,
}
SUBCOMMANDS = tuple(COMMANDS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mla-passes",
        description="Inspect and run the mla-passes torch.compile passes for MLA decode.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
