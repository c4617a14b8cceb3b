"""Option types shared by the ``mla-passes`` subcommands.

Every value a user types is checked when the command line is parsed, before
anything runs: each callable here is an ``argparse`` ``type=``, and a bad
value raises ``ArgumentTypeError``, which argparse turns into a usage error
(exit 2, ``error: argument --heads: expected ...``) naming the option and
saying what it takes. No traceback, and no value quietly replaced by a
default. A rule that spans two options (``bench --device cpu`` needs
``--check-only``) is checked at the top of the command's ``run`` with
:func:`usage_error`, which answers the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def int_in(minimum: int, maximum: int | None = None, why: str = ""):
    """An int in ``[minimum, maximum]`` (no upper bound when ``maximum`` is None);
    ``why`` says where the upper bound comes from."""
    if maximum is None:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    else:
        expected = f"an integer from {minimum} to {maximum}" + (f" ({why})" if why else "")

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if v < minimum or (maximum is not None and v > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {v}")
        return v

    parse.__name__ = f"int_in_{minimum}_{maximum}"
    return parse


positive_int = int_in(1)
nonnegative_int = int_in(0)
# torch.Generator.manual_seed takes 64-bit seeds; the tools add small offsets to theirs
seed_int = int_in(0, 2**32 - 1, "a 32-bit seed")


def comma_list(choices):
    """A comma-separated, non-empty subset of ``choices`` (in the order given, repeats dropped)."""
    allowed = ",".join(choices)

    def parse(text: str) -> list[str]:
        names = [s.strip() for s in text.split(",") if s.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {allowed}, got {text!r}")
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, bad))}; expected a comma-separated "
                                             f"list of {allowed}")
        return list(dict.fromkeys(names))

    parse.__name__ = "comma_list"
    return parse


def device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (whether that device exists is the command's check)."""
    kind, _, index = text.partition(":")
    if text in ("cpu", "cuda") or (kind == "cuda" and index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def output_file(text: str) -> str:
    """A file to write: its folder exists, and the path is not a folder."""
    p = Path(text)
    if not text:
        raise argparse.ArgumentTypeError("expected a file path, got ''")
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; expected a file path")
    parent = p.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"cannot write {text}: {parent} {what}")
    return text


def output_dir(text: str) -> str:
    """A folder to write into, existing or to be made: neither it nor a folder above it is a file."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder path, got ''")
    p = Path(text)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                what = "is a file" if q == p else f"cannot be made: {q} is a file"
                raise argparse.ArgumentTypeError(f"expected a folder; {text} {what}")
            break
    return text


def json_file(text: str) -> str:
    """An existing file holding a JSON object."""
    p = Path(text)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file" if not p.exists() else f"{text} is not a file")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{text}: not a JSON file ({e})") from None
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(f"{text}: expected a JSON object, got a {type(data).__name__}")
    return text


def usage_error(command: str, option: str, message: str) -> int:
    """Report a bad option found after parsing as argparse would: one line naming it; returns 2."""
    print(f"mla-passes {command}: error: argument {option}: {message}", file=sys.stderr)
    return 2


__all__ = ["comma_list", "device", "int_in", "json_file", "nonnegative_int", "output_dir", "output_file",
           "positive_int", "seed_int", "usage_error"]
