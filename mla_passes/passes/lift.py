"""Decode q-prep lift: make the decode q-prep of every MLA attention visible.

vLLM's MLA attention op does q-absorb, q-concat and q-quant for its decode
rows inside the op, opaque to torch.compile. In a decode-bucket graph this
pass puts that work into the graph as ``mla_passes::mla_decode_q_prep`` (all
rows, invariant 1) and calls ``mla_passes::mla_attention_with_prepped_q``,
which hands the prepped rows to the layer's decode path, instead of the
attention op::

    # before (auto_functionalized v1; direct and v2 calls are handled alike)
    af = auto_functionalized(vllm.unified_mla_attention_with_output, q=q,
             kv_c_normed=kv_c, k_pe=k_pe, output=out, layer_name=ln, ...,
             kv_cache_dummy_dep=dep)
    y = getitem(af, 1)
    # after
    qp = mla_passes.mla_decode_q_prep(q, ln, L, R, out_dtype)
    mla_passes.mla_attention_with_prepped_q(q, qp, kv_c, k_pe, out, ln, dep)   # in place
    y = out

``out_dtype`` (fp8 when the layer's backend takes a quantized q) is read at
compile time from the layer state, through the placeholder's real
``LayerName``; a layer the resolver does not know is left alone (debug log).
Calls with output quantization or DCP are left alone. Idempotent: the
rewritten call is no longer a vLLM attention op.

The rewrite is procedural rather than an Inductor ``register_replacement``:
``out_dtype`` comes from a run-time registry lookup per layer, the
attention's mutated output has to be defunctionalized (an in-place call, see
DESIGN §3), and three call forms (direct, v1, v2) would need three patterns.
It finds the attentions through the registered anchor pattern of
:mod:`mla_passes.patterns.q_prep_lift`.
"""

from __future__ import annotations

import torch
from torch.fx import Graph

from .. import fx
from .. import ops as _ops  # noqa: F401  (registers torch.ops.mla_passes)
from ..layers import UnsupportedLayer, layer_name_str, resolve_layer
from ..op_handles import op_handles
from ..patterns import q_prep_lift
from .base import MLAGraphPass

Q_PREP = torch.ops.mla_passes.mla_decode_q_prep.default
ATTN_PREPPED = torch.ops.mla_passes.mla_attention_with_prepped_q.default

# Attention arguments the prepped-q path does not model: a call that sets
# any of them is left alone.
UNSUPPORTED_ARGS = ("output_scale", "output_block_scale", "quant_group_size", "q_dcp_replicated", "mqa_q_prepared")
# Why, where a reason is more than "argument set". vLLM 0.34's mqa_q_prepared: the
# model code already absorbed/concatenated q (and wrote the cache) outside the op.
_ARG_WHY = {"mqa_q_prepared": "the model code prepares the decode q itself (vLLM's prepare_mqa_query)"}


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
    for name in UNSUPPORTED_ARGS:
        try:
            value = attn.arg(name)
        except KeyError:  # not in this vLLM's schema (mqa_q_prepared before 0.34)
            continue
        if value is not None:
            return f"argument {name!r} is set" + (f": {_ARG_WHY[name]}" if name in _ARG_WHY else "")
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


class MLADecodeQPrepLiftPass(MLAGraphPass):
    """Lift the decode q-prep out of every MLA attention call (see module doc)."""

    name = "mla_decode_q_prep_lift"

    def apply(self, graph: Graph) -> int:
        handles = op_handles()
        count = 0
        mode = None  # the graph's fake mode, found at the first rewrite
        for attn in q_prep_lift.attention_calls(graph, handles):  # the registered anchor pattern
            where = f"attention {attn.node.name} ({describe_layer(attn.arg('layer_name'))})"
            plan = self.guarded(where, self._plan, attn, where)
            if plan is None:
                continue
            if mode is None:
                mode = fx.graph_fake_mode(graph)
            q, ln, L, R, out_dtype = plan
            with graph.inserting_before(attn.node):
                qp = fx.call(graph, Q_PREP, (q, ln, L, R, out_dtype), fake_mode=mode)
            replace_attention(graph, attn, q, qp, attn.arg("kv_c_normed"), attn.arg("k_pe"),
                              attn.arg("kv_cache_dummy_dep"), fake_mode=mode)
            count += 1
        return count

    def _plan(self, attn: fx.OpCall, where: str):
        """``(q, layer_name, L, R, out_dtype)`` of the q-prep to insert, or None (refused)."""
        why = check_attention(attn)
        if why:
            self.refuse(where, why)
            return None
        ln = attn.arg("layer_name")
        state = layer_state_for(self, ln, where)
        if state is None:
            return None
        q, kv_c, k_pe = attn.arg("q"), attn.arg("kv_c_normed"), attn.arg("k_pe")
        L, R = fx.val(kv_c).shape[-1], fx.val(k_pe).shape[-1]
        return q, ln, int(L), int(R), state.q_out_dtype(fx.val(q).dtype)
