"""Decode q-prep lift: counts, numbers, call forms, unresolvable layers."""

from __future__ import annotations

import pytest

from conftest import make_pm, run_case
from mla_passes.layers import local_layers

Q_PREP = "mla_passes.mla_decode_q_prep"
PREPPED_ATTN = "mla_passes.mla_attention_with_prepped_q"
ATTN = "mla_passes_standin.unified_mla_attention_with_output"


def lift_only_pm():
    return make_pm(fuse_rope_kvcache_cat_mla=False)  # raw RoPE left alone -> lift takes every layer


@pytest.mark.parametrize("num_layers", [1, 2, 4])
def test_lift_counts(num_layers):
    pm = lift_only_pm()
    res = run_case(pm, num_layers=num_layers)
    b = res.backend
    assert pm.matched_counts == {"mla_qk_rope_kvcache_fusion": 0, "mla_decode_q_prep_lift": num_layers}
    assert b.count_after(ATTN) == 0
    assert b.count_after(Q_PREP) == b.count_after(PREPPED_ATTN) == num_layers
    # the cache update and RoPE stay as they were
    assert b.count_after("mla_passes_standin.unified_mla_kv_cache_update") == num_layers


@pytest.mark.parametrize("functionalized_v2", [False, True])
def test_lift_auto_functionalized_v1_v2(functionalized_v2):
    """The attention call in auto_functionalized_v2 form is lifted too."""
    pm = lift_only_pm()
    res = run_case(pm, functionalized_v2=functionalized_v2, num_decode_tokens=3)
    assert pm.matched_counts["mla_decode_q_prep_lift"] == 2
    assert ("auto_functionalized_v2" in res.backend.graph_before) == functionalized_v2


def test_lift_fp8_q():
    pm = lift_only_pm()
    res = run_case(pm, num_layers=1, q_fp8=True)
    assert "torch.float8_e4m3fn" in res.backend.graph_after


def test_unresolvable_layer_not_rewritten():
    """A layer the resolver does not know at compile time is left alone, not crashed on."""
    pm = lift_only_pm()

    class Hidden:  # hides every layer from the resolver while the passes run
        matched_counts: dict = {}

        def __call__(self, graph):
            saved = dict(local_layers._layers)
            local_layers.clear()
            try:
                pm(graph)
            finally:
                local_layers._layers.update(saved)

        def uuid(self):
            return None

    res = run_case(Hidden(), num_layers=1)
    assert pm.matched_counts == {"mla_qk_rope_kvcache_fusion": 0, "mla_decode_q_prep_lift": 0}
    assert any("not resolvable" in r for p in pm.passes for r in p.refusals)
    assert res.backend.count_after(ATTN) == 1


def test_lift_idempotent():
    """Lifting twice adds nothing the second time."""
    from mla_passes.passes import MLADecodeQPrepLiftPass

    lift = MLADecodeQPrepLiftPass()
    counts = []

    class Twice:
        matched_counts = {}

        def __call__(self, graph):
            counts.append(lift(graph))
            counts.append(lift(graph))

        def uuid(self):
            return None

    run_case(Twice())
    assert counts == [2, 0]
