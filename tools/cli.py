"""The ``mla-passes`` command line.

Each subcommand lives in its own module ``mla_passes.tools.<name>`` that
defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("demo", "dump", "diff", "report", "patterns", "lint", "bench", "bench-step")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mla-passes",
        description="Inspect and run the mla-passes torch.compile passes for MLA decode.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"mla_passes.tools.{name.replace('-', '_')}")
        except ModuleNotFoundError as e:
            if e.name != f"mla_passes.tools.{name.replace('-', '_')}":
                raise
            continue
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
