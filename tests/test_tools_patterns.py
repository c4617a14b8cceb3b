"""``mla-passes patterns`` lists every (pattern, replacement) pair the pattern
modules register, as FX code."""

from __future__ import annotations

import json

from mla_passes.patterns import all_patterns, pattern_modules
from mla_passes.tools import cli


def _registered() -> list[tuple[str, str]]:
    """(name, module) of every pair, read from the modules' own PATTERNS lists."""
    return [(name, m.__name__) for m in pattern_modules() for name, _, _ in getattr(m, "PATTERNS", ())]


def test_lists_every_registered_pattern(capsys):
    registered = _registered()
    assert len(registered) >= 3  # lift + fusion raw form + fusion fused-rope form
    assert cli.main(["patterns"]) == 0
    out = capsys.readouterr().out
    for name, module in registered:
        assert f"=== {name}  ({module})" in out
    assert out.count("=== ") == len(registered)
    assert out.count("--- pattern\n") == out.count("--- replacement\n") == len(registered)
    assert f"\n{len(registered)} patterns\n" in out
    assert "= None" not in out  # tails stripped for reading
    # every pair shows real FX code: a forward and at least one op call each side
    for block in out.split("=== ")[1:]:
        pattern, replacement = block.split("--- pattern\n")[1].split("--- replacement\n")
        assert pattern.startswith("def forward(self") and "torch.ops." in pattern
        assert replacement.startswith("def forward(self") and "torch.ops.mla_passes." in replacement


def test_list_json_and_filter(capsys):
    registered = _registered()
    assert cli.main(["patterns", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{n}  ({m})" for n, m in registered]

    assert cli.main(["patterns", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(d["name"], d["module"]) for d in data] == registered
    assert [d["name"] for d in data] == [e.name for e in all_patterns()]

    first = registered[0][0]
    assert cli.main(["patterns", "--list", first]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(first)
    assert cli.main(["patterns", "no_such_pattern_xyz"]) == 2
