"""The fusion and the lift match through registered Inductor patterns: each
known graph form hits its pattern, per layer, and the semantic RoPE check
is only the fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import make_pm, run_case
from mla_passes.testing import models
from mla_passes.op_handles import op_handles
from mla_passes.patterns import q_prep_lift, qk_rope_kvcache

FUSION = "mla_qk_rope_kvcache_fusion"


def _fusion(pm):
    return next(p for p in pm.passes if p.name == FUSION)


RAW_CASES = [
    ("native", False, "rope_gptj_native"),
    ("native", True, "rope_neox_native"),
    ("deepseek", False, "rope_gptj_deepseek"),
    ("deepseek", True, "rope_neox_deepseek"),
    # each read of x through its own view node, as vLLM's traced graph has it (the vLLM-CPU run fell
    # back to the semantic check because the patterns bound x once)
    ("native_views", False, "rope_gptj_native"),
    ("deepseek_views", False, "rope_gptj_deepseek"),
    ("deepseek_views", True, "rope_neox_deepseek"),
]


@pytest.mark.parametrize("cos_sin_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rope,is_neox,pattern", RAW_CASES)
def test_raw_form_hits_its_rope_pattern(rope, is_neox, pattern, cos_sin_dtype):
    """Each RoPE form vLLM traces is matched by its registered pattern (q and k of every layer), not semantically."""
    pm = make_pm()
    run_case(pm, num_layers=3, rope=rope, is_neox=is_neox, cos_sin_dtype=cos_sin_dtype)
    assert pm.matched_counts[FUSION] == 3
    assert dict(_fusion(pm).pattern_counts) == {
        pattern: 6, "q_pe_scatter": 3, "mla_kv_cache_update": 3, "mla_attention": 3}


@pytest.mark.parametrize("is_neox", [False, True])
def test_fused_rope_form_hits_its_patterns(is_neox):
    """vLLM's fused-rope op form is matched by the fused-rope anchor and the q scatter pattern."""
    pm = make_pm()
    run_case(pm, num_layers=2, form="fused_rope", is_neox=is_neox)
    assert dict(_fusion(pm).pattern_counts) == {
        "fused_rope_kv_cache_update": 2, "fused_rope_q_scatter": 2, "mla_attention": 2}


@pytest.mark.parametrize("rope,is_neox,pattern", [RAW_CASES[0], RAW_CASES[3]])
def test_patterns_hit_through_inductor(rope, is_neox, pattern):
    """The patterns match the graph real Inductor hands the custom post pass (fp32 cos/sin: casts in the graph)."""
    pm = make_pm()
    run_case(pm, num_layers=2, rope=rope, is_neox=is_neox, cos_sin_dtype=torch.float32, inductor=True)
    assert _fusion(pm).pattern_counts[pattern] == 4
    assert _fusion(pm).pattern_counts["rope_semantic"] == 0


def _rope_commuted(positions, q_pe, k_pe, cos_sin_cache, is_neox):
    """True GPT-J RoPE written cos * x1 (operands commuted): no registered pattern, still RoPE."""
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)

    def rot(x):
        c, s = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((c * x1 - s * x2, c * x2 + s * x1), dim=-1).flatten(-2)

    return rot(q_pe), rot(k_pe)


def test_unregistered_rope_falls_back_to_semantic_check(monkeypatch):
    """A RoPE no pattern covers is still fused, by the semantic check, and counted as such."""
    monkeypatch.setitem(models.ROPES, "commuted", _rope_commuted)
    pm = make_pm()
    run_case(pm, num_layers=2, rope="commuted")
    assert pm.matched_counts[FUSION] == 2
    counts = _fusion(pm).pattern_counts
    assert counts["rope_semantic"] == 2
    assert not any(counts[n] for n in qk_rope_kvcache.ROPE_FORMS)


def _rope_x2_elsewhere(positions, q_pe, k_pe, cos_sin_cache, is_neox):
    """GPT-J-shaped, but x2 is read from a rolled copy of x, not from x: not RoPE."""
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)

    def rot(x):
        c, s = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
        x1, x2 = x[..., ::2], x.roll(1, dims=0)[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)

    return rot(q_pe), rot(k_pe)


def test_x_read_from_other_memory_is_not_rope(monkeypatch):
    """The pattern binds each read of x separately; one read from other memory fails the guard and the
    semantic check, so the layer is not fused (the lift takes it) and the numbers still equal eager."""
    monkeypatch.setitem(models.ROPES, "x2_elsewhere", _rope_x2_elsewhere)
    pm = make_pm()
    run_case(pm, num_layers=2, T=4, rope="x2_elsewhere")
    assert pm.matched_counts == {FUSION: 0, "mla_decode_q_prep_lift": 2}
    assert not any(_fusion(pm).pattern_counts[n] for n in qk_rope_kvcache.ROPE_FORMS)


def test_debug_log_names_the_pattern_of_each_layer(caplog):
    """The debug log says which patterns matched each layer."""
    pm = make_pm()
    with caplog.at_level(logging.DEBUG, logger="mla_passes"):
        run_case(pm, num_layers=2, rope="deepseek", is_neox=True)
    lines = [r.getMessage() for r in caplog.records if "matched by" in r.getMessage()]
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert f"layers.{i}." in line and "rope_neox_deepseek" in line and "mla_attention" in line


def test_lift_finds_attentions_through_the_anchor():
    """The lift's attentions come from the registered ``mla_attention`` anchor, one per layer."""
    from mla_passes.bench.passes import capture_graph

    graph = capture_graph(3, H=4, T=5, form="raw")
    calls = q_prep_lift.attention_calls(graph, op_handles())
    assert len(calls) == 3 and all(c.op in op_handles().attention for c in calls)
    hits = qk_rope_kvcache.match(graph, op_handles())
    assert hits.counts() == {"mla_attention": 3, "mla_kv_cache_update": 3, "q_pe_scatter": 3}


def test_patterns_registered_once_per_process():
    """Pattern sets are built once (lru_cache), not per graph."""
    h = op_handles()
    assert qk_rope_kvcache.patterns_for(h) is qk_rope_kvcache.patterns_for(h)
    assert q_prep_lift.patterns_for(h) is q_prep_lift.patterns_for(h)


def test_rope_guard_refuses_cos_sin_of_two_gathers():
    """cos and sin from different gathers (or swapped halves) fail the pattern's extra_check."""
    from mla_passes.bench.passes import capture_graph

    graph = capture_graph(1, H=4, T=5, form="raw")
    hits = qk_rope_kvcache.match(graph, op_handles())
    ss = hits.named("q_pe_scatter")[0]
    q_rot = ss["q_pe_rot"]
    hits.pattern_set.match_at(q_rot, hits, qk_rope_kvcache.ROPE_FORMS)
    (hit,) = [h for h in hits.by_root[q_rot] if h.name in qk_rope_kvcache.ROPE_FORMS]
    assert hit["cos_sin_source"] is not None
    swapped = dict(hit.kwargs, cos=hit["sin"], sin=hit["cos"])
    assert qk_rope_kvcache.rope_source(qk_rope_kvcache._HitView(hit.name, swapped)) is None


@pytest.mark.parametrize("rope,is_neox", [("native", False), ("deepseek", True), ("native_views", False),
                                         ("deepseek_views", False)])
def test_replayed_matches_equal_the_matcher(rope, is_neox):
    """A match replayed from an earlier layer's shape binds exactly what Inductor's matcher binds at that node."""
    from torch._inductor.pattern_matcher import is_match

    st = models.build_decode_stack(3, H=4, hidden=64, rope=rope, is_neox=is_neox)
    graph = _capture(st)
    hits = qk_rope_kvcache.match(graph, op_handles())
    ps = hits.pattern_set
    roots = [ss["q_pe_rot"] for ss in hits.named("q_pe_scatter")]
    assert len(roots) == 3
    for r in roots:
        ps.match_at(r, hits, qk_rope_kvcache.ROPE_FORMS)
    got = [h for r in roots for h in hits.by_root[r] if h.name in qk_rope_kvcache.ROPE_FORMS]
    assert len(got) == 3 and len({h.name for h in got}) == 1
    entries = ps.pm_pass.patterns[(roots[0].op, roots[0].target)]
    for h in got:
        direct = [m for e in entries if ps._names[id(e)] == h.name and is_match(m := e.pattern.match(h.root))]
        assert len(direct) == 1
        want = {k: v for k, v in direct[0].kwargs.items()}
        assert {k: v for k, v in h.kwargs.items() if k != "cos_sin_source"} == want
        assert set(h.nodes) == set(direct[0].nodes)


def test_replay_refuses_a_changed_literal():
    """A layer whose subgraph differs from the recorded shape in one literal is not replayed (the matcher decides)."""
    from mla_passes.patterns._engine import _Shape

    st = models.build_decode_stack(2, H=4, hidden=64, rope="native", is_neox=False)
    graph = _capture(st)
    hits = qk_rope_kvcache.match(graph, op_handles())
    ps = hits.pattern_set
    r0, r1 = [ss["q_pe_rot"] for ss in hits.named("q_pe_scatter")]
    ps.match_at(r0, hits, qk_rope_kvcache.ROPE_FORMS)
    (entry,) = [e for e in ps.pm_pass.patterns[(r0.op, r0.target)] if ps._names[id(e)] == "rope_gptj_native"]
    shapes = ps._shapes[id(entry)]
    assert _Shape.replay(shapes, r1, entry.pattern) is not None
    sl = next(n for n in graph.nodes if n.target is torch.ops.aten.slice.Tensor and len(n.args) == 5
              and n.args[3:] == (9223372036854775807, 2) and n.args[2] == 1 and n in set(_ancestors(r1)))
    sl.args = sl.args[:4] + (3,)  # step 3: not RoPE any more
    assert _Shape.replay(shapes, r1, entry.pattern) is None


def _ancestors(n, depth=8):
    out, work = [], [(n, 0)]
    while work:
        m, d = work.pop()
        out.append(m)
        if d < depth:
            work.extend((a, d + 1) for a in m.all_input_nodes)
    return out


def _capture(st):
    from mla_passes.testing.backend import capture_graph

    return capture_graph(st.module, st, 5)


def test_shape_record_learns_when_full():
    """Shapes recorded from other graphs (4, the cap) do not stop a new graph's layer shape from being
    recorded: its second layer replays the first's (was: the record stopped growing at 4, so a process
    that had compiled other graphs first matched every layer of a new one from scratch)."""
    from mla_passes.patterns._engine import _Shape

    def first_entry_and_roots(H, hidden):
        st = models.build_decode_stack(2, H=H, hidden=hidden, rope="native", is_neox=False)
        graph = _capture(st)
        hits = qk_rope_kvcache.match(graph, op_handles())
        ps = hits.pattern_set
        r0, r1 = [ss["q_pe_rot"] for ss in hits.named("q_pe_scatter")]
        (entry,) = [e for e in ps.pm_pass.patterns[(r0.op, r0.target)] if ps._names[id(e)] == "rope_gptj_native"]
        return ps, hits, entry, r0, r1

    ps, hits, entry, r0, _ = first_entry_and_roots(4, 64)
    ps.match_at(r0, hits, qk_rope_kvcache.ROPE_FORMS)
    other = ps._shapes[id(entry)][0]
    ps, hits, entry, r0, r1 = first_entry_and_roots(2, 32)
    assert _Shape.replay([other], r1, entry.pattern) is None  # another graph's shape does not fit this one
    ps._shapes[id(entry)] = [other] * 4
    ps.match_at(r0, hits, qk_rope_kvcache.ROPE_FORMS)
    shapes = ps._shapes[id(entry)]
    assert len(shapes) == 4 and shapes[0] is not other
    assert _Shape.replay(shapes, r1, entry.pattern) is not None
