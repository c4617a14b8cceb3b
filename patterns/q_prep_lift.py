"""Inductor pattern of the decode q-prep lift.

``MLADecodeQPrepLiftPass`` (:mod:`mla_passes.passes.lift`) finds every MLA
attention through the registered anchor ``mla_attention`` (the attention op
called directly, or through ``auto_functionalized`` v1/v2, binding
``layer_name``) and rewrites each one it can::

    attention(q, kv_c, k_pe, out, ln, ..., kv_cache_dummy_dep=dep)
    # ->
    qp = mla_passes.mla_decode_q_prep(q, ln, L, R, out_dtype)
    mla_passes.mla_attention_with_prepped_q(q, qp, kv_c, k_pe, out, ln, dep)

The rewrite stays procedural (a replacement pattern cannot say it):
``out_dtype`` comes from the layer state at compile time, and the mutated
``output`` is defunctionalized into an in-place call (DESIGN §3).
"""

from __future__ import annotations

import functools

from ._engine import Hits, PatternSet, anchor_calls, register_op_anchor


@functools.lru_cache(maxsize=None)
def pattern_set(attention: frozenset) -> PatternSet:
    """The lift's patterns for these attention overloads, registered once per process."""
    ps = PatternSet("mla_decode_q_prep_lift", __name__)
    register_op_anchor(ps, "mla_attention", "the MLA attention (direct, auto_functionalized v1 or v2)", attention)
    return ps


def patterns_for(handles) -> PatternSet:
    return pattern_set(handles.attention)


def attention_calls(graph, handles) -> list:
    """Every MLA attention call the anchor matches in ``graph`` (as OpCalls, graph order)."""
    hits: Hits = patterns_for(handles).match(graph, ("mla_attention",))
    return anchor_calls(hits, ("mla_attention",), handles.attention)
