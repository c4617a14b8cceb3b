"""The attention swap both passes make: a vLLM MLA attention call replaced by
``mla_passes::mla_attention_with_prepped_q`` (DESIGN §4.5), which takes the
decode q already prepped.

:func:`check_attention` says why a call cannot take a prepped q (arguments
the prepped-q path does not model, an output it cannot write in place);
:func:`layer_state_for` resolves the layer state behind its ``layer_name``
(a refusal when the resolver does not know it); :func:`replace_attention`
inserts the in-place call and erases the old one. The lift
(:mod:`mla_passes.passes.lift`) and the fusion
(:mod:`mla_passes.passes.fusion`) differ only in where the prepped q comes
from.
"""

from __future__ import annotations

import torch
from torch.fx import Graph

from .. import fx
from .. import ops as _ops  # noqa: F401  (registers torch.ops.mla_passes)
from ..layers import UnsupportedLayer, layer_name_str, resolve_layer
from ..vllm.tables import ATTENTION_ARG_WHY, UNSUPPORTED_ATTENTION_ARGS
from .base import MLAGraphPass

ATTN_PREPPED = torch.ops.mla_passes.mla_attention_with_prepped_q.default


def layer_state_for(pass_: MLAGraphPass, ln_node, where):
    """The layer state behind a ``layer_name`` node, or None (refusal logged)."""
    v = fx.val(ln_node)
    if v is None and not isinstance(ln_node, torch.fx.Node):
        v = ln_node  # a constant str / LayerName
    try:
        return resolve_layer(v)
    except (KeyError, TypeError) as e:
        pass_.refuse(where, "layer state not resolvable at compile time (%s)", e)
        return None
    except UnsupportedLayer as e:  # a layout the resolver names (vLLM: ShardQ, sparse, KV sharing...)
        pass_.refuse(where, "%s", e)
        return None


def compile_time_facts(state) -> tuple:
    """What the passes read from a layer state at compile time: the cache
    dtype (checked against the graph's) and the prepped q's dtype (fp8 when
    the layer quantizes q; shown for an fp32 model). The pass manager hashes
    these into its uuid."""
    return (state.kv_cache_dtype, str(state.q_out_dtype(torch.float32)))


def describe_layer(ln_node) -> str:
    try:
        return layer_name_str(fx.val(ln_node) if isinstance(ln_node, torch.fx.Node) else ln_node)
    except TypeError:
        return str(ln_node)


def replace_attention(graph: Graph, attn: fx.OpCall, q, q_prepped, kv_c, k_pe, dep, *,
                      fake_mode=None) -> torch.fx.Node:
    """Insert the in-place ``mla_attention_with_prepped_q`` before ``attn.node``,
    point users of the old output at ``output`` and erase the old call
    (``fake_mode``: the graph's, see :func:`fx.graph_fake_mode`)."""
    output = attn.mutable_input("output")
    ln = attn.arg("layer_name")
    with graph.inserting_before(attn.node):
        new = fx.call(graph, ATTN_PREPPED, (q, q_prepped, kv_c, k_pe, output, ln, dep), fake_mode=fake_mode)
    for gi in attn.mutated_value_getitems("output"):
        gi.replace_all_uses_with(output)
        graph.erase_node(gi)
    for gi in list(attn.node.users):
        if not gi.users:
            graph.erase_node(gi)
    if attn.node.users:
        raise AssertionError(f"attention call {attn.node} still has users {list(attn.node.users)}")
    graph.erase_node(attn.node)
    return new


def check_attention(attn: fx.OpCall):
    """Why ``attn`` cannot take a prepped q (None when it can)."""
    for name in UNSUPPORTED_ATTENTION_ARGS:  # every supported vLLM's (mla_passes.vllm.tables)
        try:
            value = attn.arg(name)
        except KeyError:  # not in this vLLM's schema (mqa_q_prepared before 0.34)
            continue
        if value is not None:
            why = ATTENTION_ARG_WHY.get(name)
            return f"argument {name!r} is set" + (f": {why}" if why else "")
    try:
        out = attn.mutable_input("output")
    except NotImplementedError:
        return "output is a view in an auto_functionalized_v2 call"
    if not isinstance(out, torch.fx.Node):
        return "output is not a graph value"
    for gi in attn.node.users:
        if attn.form != "direct" and gi not in attn.mutated_value_getitems("output") and gi.users:
            return f"result {gi} of the attention call is used"
    return None
