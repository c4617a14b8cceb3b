"""vLLM 0.34's attention op takes one more argument, ``mqa_q_prepared``: a
decode q the model code already absorbed and concatenated (and, before it,
wrote the cache). Such a call is refused by name; the same op without it is
the 0.32/0.33 form. No vLLM needed: a test op carries the 0.34 schema (its
table in :mod:`mla_passes.vllm.tables`).
"""

from __future__ import annotations

import torch
from torch.fx import Graph

import mla_passes  # noqa: F401
from mla_passes import fx
from mla_passes.ops import LAYER_NAME_TYPE
from mla_passes.passes.attention import check_attention
from mla_passes.testing import standins
from mla_passes.vllm.tables import V0_34

_lib = torch.library.Library("mla_passes_test034", "DEF")
_lib.define(V0_34.ops["attention"] + V0_34.schema("attention", LAYER_NAME_TYPE))
ATTN_034 = getattr(torch.ops.mla_passes_test034, V0_34.ops["attention"]).default


def _call(op, **kwargs) -> fx.OpCall:
    g = Graph()
    q, kv_c, k_pe, out, ln, prep = (g.placeholder(n) for n in ("q", "kv_c", "k_pe", "out", "ln", "prep"))
    extra = {"mqa_q_prepared": prep} if kwargs.get("prepared") else {}
    g.call_function(op, (q, kv_c, k_pe, out, ln), extra)
    (call,) = fx.find_op_calls(g, {op})
    return call


def test_mqa_q_prepared_refused_by_name():
    """A 0.34 attention call with a q prepared in model code is refused, and the reason says so."""
    why = check_attention(_call(ATTN_034, prepared=True))
    assert why is not None and "mqa_q_prepared" in why and "model code" in why


def test_034_schema_without_prepared_q_is_accepted():
    """The 0.34 op without mqa_q_prepared is the form the passes rewrite."""
    assert check_attention(_call(ATTN_034)) is None


def test_033_schema_has_no_prepared_q_and_is_accepted():
    """On the 0.32/0.33 schema (no mqa_q_prepared argument) the check does not trip over the missing name."""
    assert check_attention(_call(standins.attention_with_output)) is None


def test_forms_census_counts_model_code_prepared_q():
    """The report's census: an attention with mqa_q_prepared, and one without any cache/RoPE op of its layer."""
    from mla_passes.records import attention_forms
    from mla_passes.op_handles import MLAOpHandles

    g = Graph()
    q, kv_c, k_pe, out, ln0, ln1, prep = (g.placeholder(n) for n in ("q", "kv_c", "k_pe", "out", "ln0", "ln1", "p"))
    g.call_function(ATTN_034, (q, kv_c, k_pe, out, ln0), {"mqa_q_prepared": prep})
    g.call_function(ATTN_034, (q, kv_c, k_pe, out, ln1), {})
    h = MLAOpHandles(attention=frozenset({ATTN_034}), kv_cache_update=frozenset({standins.kv_cache_update}),
                     fused_rope=frozenset({standins.fused_rope_kv_cache_update}))
    assert attention_forms(g, h) == {"attention": 2, "q_prepared_in_model": 1, "no_rope_or_cache_op": 1}
    g.call_function(standins.kv_cache_update, (kv_c, k_pe, ln1, "auto", out))
    assert attention_forms(g, h) == {"attention": 2, "q_prepared_in_model": 1, "no_rope_or_cache_op": 0}
