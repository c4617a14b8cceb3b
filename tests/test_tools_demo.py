"""``mla-passes demo --short``: its numbers, and its two depyf dumps (passes
off / on) through ``diff`` and ``lint``. One demo run serves the module."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from mla_passes.diagnostics.lint import lint_path
from mla_passes import cli
from mla_passes.diagnostics import demo
from mla_passes.diagnostics.diff import compare_paths

LAYERS, HEADS, TOKENS = demo.SHORT["layers"], demo.SHORT["heads"], demo.SHORT["tokens"]
FUSION, LIFT = "mla_qk_rope_kvcache_fusion", "mla_decode_q_prep_lift"


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    r = demo.run_demo(**demo.SHORT, seed=0, out=str(out))
    return r, out


def _checks(r):
    return {c.name: c for c in r.checks}


def test_config_has_deepseek_v3_head_dims(result):
    r, _ = result
    assert (r.config["P"], r.config["L"], r.config["R"], r.config["V"]) == (128, 512, 64, 128)
    assert (r.config["layers"], r.config["heads"], r.config["tokens"]) == (LAYERS, HEADS, TOKENS)
    assert r.config["kv_cache_dtype"] == "fp8" and r.config["q"] == "fp8"


def test_fusion_takes_every_layer(result):
    r, _ = result
    assert r.matched == {FUSION: LAYERS, LIFT: 0}
    table = {t: (b, a) for t, b, a in r.op_table}
    assert table["mla_passes.mla_fused_decode_prep"] == (0, LAYERS)
    assert table["mla_passes.mla_attention_with_prepped_q"] == (0, LAYERS)
    assert table["mla_passes_standin.unified_mla_attention_with_output"] == (LAYERS, 0)
    assert table["mla_passes_standin.unified_mla_kv_cache_update"] == (LAYERS, 0)
    assert table["aten.slice_scatter"] == (LAYERS, 0)  # q[..., P:] = rope(q_pe)
    assert table["aten.index"] == (LAYERS, 0)  # cos/sin gather, absorbed
    assert r.total_ops[1] < r.total_ops[0] / 2


def test_demo_runs_deepseek_rope_through_the_registered_patterns(result):
    """The demo's default is DeepSeek's GPT-J RoPE, matched by the registered pattern (q and k per layer)."""
    r, _ = result
    assert r.config["rope"] == "gptj"
    assert r.patterns == {"mla_attention": LAYERS, "mla_kv_cache_update": LAYERS, "q_pe_scatter": LAYERS,
                          "rope_gptj_native": 2 * LAYERS}


def test_passes_on_agree_with_passes_off(result):
    r, _ = result
    c = _checks(r)
    assert all(ch.ok for ch in r.checks), [ch for ch in r.checks if not ch.ok]
    assert r.ok
    # same inputs in layer 0: bf16 RoPE within rounding, fp8 values within one step
    assert c["layer 0 rotated q_pe (bf16)"].max_err <= 0.02
    assert c["layer 0 rotated k_pe (bf16)"].max_err <= 0.02
    assert c["layer 0 prepped q (fp8)"].ok and "codes differ" in c["layer 0 prepped q (fp8)"].detail
    assert c["layer 0 cache rows written (fp8)"].ok
    # nothing but the step's slots written, in any layer
    untouched = c["every layer: cache rows not written"]
    assert untouched.ok and untouched.max_err == 0.0
    assert c["stack output"].max_err < 0.03
    for name in ("every layer: rotated q_pe", "every layer: rotated k_pe"):
        assert c[name].max_err < 0.02
    for name in ("every layer: prepped q", "every layer: cache rows written"):
        assert c[name].max_err < 0.05


def test_rewritten_graph_lints_clean(result):
    r, out = result
    assert r.lint_findings == []  # live, right after the passes
    for side in ("off", "on"):
        found = lint_path(out / side)
        assert len(found) >= 5  # Captured_Graph, Forward_graph, AFTER_POST_GRAD, ...
        assert {f: v for f, v in found.items() if v} == {}


def test_diff_off_vs_on_reports_fused_op_added_and_absorbed_ops_removed(result):
    r, out = result
    assert r.dumps == {"off": str(out / "off"), "on": str(out / "on")}
    pairs = {p.key: p for p in compare_paths(out / "off", out / "on")}
    post = pairs["fn0.AFTER_POST_GRAD.0"]
    assert post.status == "changed"
    d = post.changed_ops()
    assert d["mla_passes.mla_fused_decode_prep.default"] == LAYERS
    assert d["mla_passes.mla_attention_with_prepped_q.default"] == LAYERS
    assert d["mla_passes_standin.unified_mla_attention_with_output.default"] == -LAYERS
    assert d["mla_passes_standin.unified_mla_kv_cache_update.default"] == -LAYERS
    assert d["aten.slice_scatter.default"] == -LAYERS
    assert d["aten.index.Tensor"] == -LAYERS
    assert all(v < 0 for t, v in d.items() if t.startswith("aten."))  # only removals among aten ops
    assert "torch.ops.mla_passes.mla_fused_decode_prep.default(" in post.diff
    assert re.search(r"^\+.*mla_fused_decode_prep", post.diff, re.M)
    assert re.search(r"^-.*unified_mla_kv_cache_update", post.diff, re.M)
    # graphs before the post-grad passes are identical; our pass graphs only exist with passes on
    assert pairs["fn0.Captured_Graph.0"].status == "identical"
    only_b = sorted(k for k, p in pairs.items() if p.status == "only_b")
    assert only_b == [f"fn0.mla_passes_{w}_{p}.0" for w in ("after", "before") for p in (LIFT, FUSION)]
    assert not [k for k, p in pairs.items() if p.status == "only_a"]


def test_diff_of_the_fusion_pass_graphs_matches_the_demo_op_table(result):
    """Two independent counters: text parsing of the dumped graph files vs
    the fx-node counts the demo's backend took before/after the passes."""
    r, out = result
    before = next((out / "on").glob(f"__compiled_fn_*.mla_passes_before_{FUSION}.0.py"))
    after = next((out / "on").glob(f"__compiled_fn_*.mla_passes_after_{FUSION}.0.py"))
    (pair,) = compare_paths(before, after)
    by_packet: dict[str, int] = {}
    for t, v in pair.changed_ops().items():
        packet = t.rsplit(".", 1)[0] if t.count(".") >= 2 else t
        by_packet[packet] = by_packet.get(packet, 0) + v
    demo_delta = {t: a - b for t, b, a in r.op_table if t != "getitem"}
    assert by_packet == demo_delta


def test_cli_prints_and_exits(result, monkeypatch, capsys):
    r, _ = result
    seen = {}

    def fake_run_demo(**kw):
        seen.update(kw)
        return r

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert cli.main(["demo", "--short", "--no-dump"]) == 0
    text = capsys.readouterr().out
    assert seen == dict(layers=LAYERS, heads=HEADS, tokens=TOKENS, seed=0, out=None, dump=False, backend="auto")
    assert re.search(rf"{FUSION} +{LAYERS}\n", text)
    assert re.search(rf"mla_passes\.mla_fused_decode_prep +0 +{LAYERS}\n", text)
    assert "depyf dumps:" in text and "mla-passes diff" in text
    assert text.rstrip().splitlines()[-1].startswith("OK (")

    assert cli.main(["demo", "--short", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["matched"][FUSION] == LAYERS

    bad = dataclasses.replace(r, checks=r.checks + [demo.Check("planted", 1.0, 0.5, False)])
    monkeypatch.setattr(demo, "run_demo", lambda **kw: bad)
    assert cli.main(["demo", "--short"]) == 1
    assert "FAIL planted" in capsys.readouterr().out
    unmatched = dataclasses.replace(r, matched={FUSION: 0, LIFT: 0})
    monkeypatch.setattr(demo, "run_demo", lambda **kw: unmatched)
    assert cli.main(["demo", "--short"]) == 1
    assert "FAIL: no pass matched" in capsys.readouterr().out


def test_fp8_check_counts_one_step_and_rejects_two():
    """The fp8 comparison allows exactly one code of difference."""
    scale = torch.tensor([0.5])
    ref = torch.tensor([1.0, 2.0, 3.0, 0.25]) * scale  # values on fp8 codes (dequantized)
    one_step = ref.clone()
    one_step[1] = 2.25 * 0.5  # next code above 2.0 (step 0.25 in [2, 4))
    assert demo._fp8_close("x", one_step, ref, scale, torch.float8_e4m3fn).ok
    two_steps = ref.clone()
    two_steps[1] = 2.5 * 0.5
    c = demo._fp8_close("x", two_steps, ref, scale, torch.float8_e4m3fn)
    assert not c.ok and "1/4 codes differ" in c.detail
