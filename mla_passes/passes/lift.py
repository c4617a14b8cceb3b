"""Decode q-prep lift: make the decode q-prep of every MLA attention visible.

vLLM's MLA attention op does q-absorb, q-concat and q-quant for its decode
rows inside the op, opaque to torch.compile. In a decode-bucket graph this
pass puts that work into the graph as ``mla_passes::mla_decode_q_prep`` (all
rows, invariant 1) and calls ``mla_passes::mla_attention_with_prepped_q``,
which hands the prepped rows to the layer's decode path, instead of the
attention op::

    # before (auto_functionalized v1; direct and v2 calls are handled alike)
    af = auto_functionalized(ATTENTION, q=q,   # vLLM's MLA attention op (mla_passes.vllm.tables)
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
from ..op_handles import op_handles
from ..patterns import q_prep_lift
from ..vllm import tables as vllm_tables
from . import attention
from .attention import check_attention, describe_layer, layer_state_for, replace_attention
from .base import MLAGraphPass

Q_PREP = torch.ops.mla_passes.mla_decode_q_prep.default


class MLADecodeQPrepLiftPass(MLAGraphPass):
    """Lift the decode q-prep out of every MLA attention call (see module doc)."""

    name = "mla_decode_q_prep_lift"

    def source_modules(self) -> list:
        return super().source_modules() + [attention, vllm_tables]  # the attention check reads the tables

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
