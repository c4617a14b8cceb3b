"""QK-RoPE / KV-cache / q-prep fusion: match counts, op counts and numbers."""

from __future__ import annotations

import pytest
import torch

from conftest import make_pm, run_case

FUSED = "mla_passes.mla_fused_decode_prep"
PREPPED_ATTN = "mla_passes.mla_attention_with_prepped_q"
ATTN = "mla_passes_standin.unified_mla_attention_with_output"
UPDATE = "mla_passes_standin.unified_mla_kv_cache_update"
FUSED_ROPE = "mla_passes_standin.fused_rope_unified_mla_kv_cache_update"


@pytest.mark.parametrize("num_layers", [1, 2, 4])
def test_match_count_equals_layers(num_layers):
    pm = make_pm()
    res = run_case(pm, num_layers=num_layers)
    b = res.backend
    assert pm.matched_counts == {"mla_qk_rope_kvcache_fusion": num_layers, "mla_decode_q_prep_lift": 0}
    assert b.count_before(ATTN) == b.count_before(UPDATE) == num_layers
    assert b.count_after(ATTN) == b.count_after(UPDATE) == 0
    assert b.count_after(FUSED) == b.count_after(PREPPED_ATTN) == num_layers
    assert b.count_after("aten.slice_scatter") == 0 and b.count_after("aten.copy") == 0


def test_each_pass_is_timed_and_logged(caplog):
    """The manager times each pass per call (pass_ms) and logs it at debug level, as vLLM's passes do."""
    import logging

    pm = make_pm()
    with caplog.at_level(logging.DEBUG, logger="mla_passes"):
        run_case(pm, num_layers=2)
    assert set(pm.pass_ms) == {"mla_qk_rope_kvcache_fusion", "mla_decode_q_prep_lift"}
    assert all(ms >= 0 for ms in pm.pass_ms.values())
    assert "mla_qk_rope_kvcache_fusion: 2 layer(s) rewritten in" in caplog.text


# the fused-rope form has no aten RoPE, so only the raw form varies the RoPE variant
@pytest.mark.parametrize("form,rope", [("raw", "native"), ("raw", "deepseek"), ("fused_rope", "native")])
@pytest.mark.parametrize("is_neox", [False, True])
def test_forms_and_rope_styles(form, is_neox, rope):
    pm = make_pm()
    res = run_case(pm, form=form, is_neox=is_neox, rope=rope)
    assert pm.matched_counts["mla_qk_rope_kvcache_fusion"] == 2
    if form == "fused_rope":
        assert res.backend.count_before(FUSED_ROPE) == 2 and res.backend.count_after(FUSED_ROPE) == 0
    # the fused op got the style the RoPE subgraph computes
    assert f"{is_neox}, " in res.backend.graph_after.split("mla_fused_decode_prep.default](args = (")[1]


@pytest.mark.parametrize("kv_cache_dtype,q_fp8", [("fp8", False), ("fp8", True), ("auto", True)])
def test_fp8_cache_and_q(kv_cache_dtype, q_fp8):
    # one layer: fp8 rounding flips in layer 0 would move layer 1's inputs past a one-step check
    pm = make_pm()
    res = run_case(pm, num_layers=1, kv_cache_dtype=kv_cache_dtype, q_fp8=q_fp8)
    assert pm.matched_counts["mla_qk_rope_kvcache_fusion"] == 1
    if q_fp8:
        assert "torch.float8_e4m3fn" in res.backend.graph_after


def test_mixed_batch_prefill_rows_read_rotated_q():
    """Prefill rows of the fused layer must see q rotated in place (rotated q for prefill rows)."""
    pm = make_pm()
    run_case(pm, T=6, num_decode_tokens=2)
    assert pm.matched_counts["mla_qk_rope_kvcache_fusion"] == 2


@pytest.mark.parametrize("form", ["raw", "fused_rope"])
def test_inductor_end_to_end(form):
    """Through real Inductor codegen: in-place fused op on views of the projections."""
    pm = make_pm()
    res = run_case(pm, form=form, inductor=True, num_decode_tokens=3, T=5)
    assert pm.matched_counts["mla_qk_rope_kvcache_fusion"] == 2
    # compiled without passes gives the same numbers too
    stack = res.stack
    torch._dynamo.reset()
    base = run_case(None, form=form, inductor=True, num_decode_tokens=3, T=5, stack=stack)
    torch.testing.assert_close(res.out.float(), base.out.float(), atol=6e-2, rtol=3e-2)


def test_full_deepseek_v3_attention_dims():
    """H=128, P=128, L=512, R=64, V=128 (hidden scaled down)."""
    pm = make_pm()
    run_case(pm, num_layers=1, H=128, hidden=128, T=3)
    assert pm.matched_counts["mla_qk_rope_kvcache_fusion"] == 1


def test_idempotent():
    """A second run of the passes on the rewritten graph finds nothing."""
    pm = make_pm()
    res = run_case(pm, form="raw")
    assert pm.matched_counts["mla_qk_rope_kvcache_fusion"] == 2

    class Twice:  # runs the manager twice on the same post-grad graph
        def __init__(self):
            self.counts = []
            self.matched_counts = {}

        def __call__(self, graph):
            pm(graph)
            self.counts.append(dict(pm.matched_counts))
            pm(graph)
            self.counts.append(dict(pm.matched_counts))

        def uuid(self):
            return pm.uuid()

    twice = Twice()
    torch._dynamo.reset()
    run_case(twice, stack=res.stack)
    assert twice.counts[0]["mla_qk_rope_kvcache_fusion"] == 2
    assert twice.counts[1] == {"mla_qk_rope_kvcache_fusion": 0, "mla_decode_q_prep_lift": 0}
