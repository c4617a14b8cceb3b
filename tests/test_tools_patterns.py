"""``mla-passes patterns`` lists the Inductor patterns the passes register
(and only those), with their variants as pattern-matcher source."""

from __future__ import annotations

import json

from mla_passes.patterns import registered_patterns
from mla_passes import cli


def _registered() -> list[tuple[str, str, int]]:
    """(pass, name, variants) of every registered pattern, read from the pattern sets."""
    return [(p, r.name, len(r.variants)) for p, r in registered_patterns()]


def test_lists_every_registered_pattern(capsys):
    """The listing once showed documentation-only pairs as "registered"; now it shows the pattern sets."""
    registered = _registered()
    names = {n for _, n, _ in registered}
    assert {"mla_attention", "mla_kv_cache_update", "fused_rope_kv_cache_update", "q_pe_scatter",
            "fused_rope_q_scatter", "rope_gptj_native", "rope_neox_native", "rope_gptj_deepseek",
            "rope_neox_deepseek"} <= names
    assert cli.main(["patterns"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== ") == len(registered)
    assert out.count("--- variant ") == sum(v for _, _, v in registered)
    for p, name, _ in registered:
        assert f"=== {p}: {name}  (mla_passes.patterns." in out
    assert f"\n{len(registered)} patterns, {sum(v for _, _, v in registered)} registered variants\n" in out
    for block in out.split("=== ")[1:]:
        for variant in block.split("--- variant ")[1:]:
            assert "CallFunction" in variant and "pattern = " in variant


def test_registered_means_in_the_pattern_matcher_pass():
    """Every listed variant is an entry of its pass's PatternMatcherPass (registered, not documented)."""
    from mla_passes.patterns import pattern_sets

    for ps in pattern_sets():
        entries = [e.pattern for es in ps.pm_pass.patterns.values() for e in es]
        for reg in ps.registered.values():
            for v in reg.variants:
                assert any(e is v for e in entries), (reg.name, v)


def test_list_json_and_filter(capsys):
    registered = _registered()
    assert cli.main(["patterns", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("  (")[0] for ln in lines] == [f"{p}: {n}" for p, n, _ in registered]

    assert cli.main(["patterns", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(d["pass_name"], d["name"], len(d["variants"])) for d in data] == registered

    assert cli.main(["patterns", "--list", "rope_neox"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("rope_neox" in ln for ln in out)
    assert cli.main(["patterns", "no_such_pattern_xyz"]) == 2


def test_fresh_process_lists_the_anchors():
    """Outside vLLM and the tests nothing fills the op roles; the listing still shows the anchors
    (over the stand-ins, with vLLM's schemas) and says so."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mla_passes.cli", "patterns", "--list"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    names = {ln.split("  (")[0].split(": ", 1)[1] for ln in r.stdout.splitlines()}
    assert {"mla_attention", "mla_kv_cache_update", "fused_rope_kv_cache_update", "fused_rope_q_scatter"} <= names
    assert "mla_passes_standin" in r.stderr
