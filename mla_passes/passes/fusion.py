"""QK-RoPE / KV-cache / q-absorb / q-cat / q-quant fusion.

Per MLA layer (the cache-update node and the attention node paired by their
``layer_name`` graph input), replaces RoPE + KV-cache write + the decode
q-prep inside the attention with one ``mla_passes::mla_fused_decode_prep``
and the attention with ``mla_passes::mla_attention_with_prepped_q``::

    # raw form (vLLM on CPU)                      # fused-rope form (vLLM's own MLA rope/kv pass)
    q_pe_rot, k_pe_rot = <RoPE aten ops>(q, k)   fr = auto_functionalized(FUSED_ROPE_KV_UPDATE,
    dep = KV_UPDATE(                                  positions, q_pe=slice(q, P:), k_pe=k, kv_c, cos_sin, ...)
              kv_c, k_pe_rot, ln, dt, k_scale)    q_new = slice_scatter(q, copy(slice(q), fr[1]), -1, P)
    q_new = slice_scatter(q, copy(slice(q), q_pe_rot), -1, P)
    af = auto_functionalized(ATTENTION, q=q_new, kv_c_normed=kv_c,
             k_pe=k_pe_rot, output=out, layer_name=ln, kv_cache_dummy_dep=dep)
    # after
    qp = mla_passes.mla_fused_decode_prep(q, kv_c, k, positions, cos_sin, is_neox, ln, out_dtype, backend,
                                          kv_cache_dtype, k_scale)   # the graph's cache-update operands
    mla_passes.mla_attention_with_prepped_q(q, qp, kv_c, k.unsqueeze(1), out, ln, None)

(``ATTENTION``, ``KV_UPDATE``, ``FUSED_ROPE_KV_UPDATE``: vLLM's ops in those
roles, named per release in :mod:`mla_passes.vllm.tables`.)

Both new calls are in place (defunctionalized, DESIGN §3): ``q[..., P:]`` and
``k`` are rotated in the projection outputs' memory, so the rotated q that
the attention (or anything else) read from ``slice_scatter`` is ``q`` itself:
the cycle ``q_new -> fused op -> q_new`` is broken by walking back from
``slice_scatter`` to its base. Users of the rotated values (prefill rows of
q, the rotated k_pe, the mutated projection output in the fused-rope form)
are rewired to views of the mutated tensors, placed after the fused op.

Refused (debug log, graph untouched for that layer): no unique cache update
and attention per ``layer_name``; a RoPE subgraph whose intermediates have
other users, that does not read q_pe from the q it writes back into, or that
is not RoPE (:mod:`mla_passes.patterns.rope`), or that rounds through a cast
the fused op would drop (:mod:`mla_passes.patterns.casts`); an attention that reads
another k_pe than the rotated one; a value the rewrite would replace by a
view of the rotated memory in another dtype (e.g. an fp32 RoPE result with a
second reader); a reader of the rotated memory after the fusion point that
expects unrotated values (aliases found by storage identity); a dependency
token with users other than the layer's attention; a layer state the
resolver does not know at compile time, or whose cache dtype differs from
the graph's; operands the kernel would refuse at run time (its own rules,
:func:`mla_passes.kernels.validate.graph_operand_problem`, asked about the
graph's values: a cache dtype it does not write, positions that are not
one per token, a k_scale that is not one float32 element; a bf16/fp16
k_scale is passed as an exact float32 copy instead). An unexpected error
while planning a layer refuses that layer with a warning (see
:mod:`mla_passes.passes.base`).

The fused op takes every operand the graph carries (``kv_cache_dtype`` and
``k_scale`` of the cache update included); the layer state is read only
for what the graph does not carry (W_UK_T, q_scale, the cache, the slots).

The pieces are found by the Inductor patterns registered in
:mod:`mla_passes.patterns.qk_rope_kvcache` (anchors, q scatters, the RoPE
forms vLLM traces; ``pattern_counts`` and the debug log name the patterns
each layer matched); a RoPE none of them covers goes to the semantic check
of :mod:`mla_passes.patterns.rope`. The plan and the rewrite stay
procedural, not ``register_replacement``: the rewrite spans the attention,
walks through ``slice_scatter`` (a pattern cannot express "the base of this
slice_scatter is the tensor the fused op mutates"), needs the compile-time
layer state for ``out_dtype`` and emits in-place calls.

This module runs the pass; the plan of each form is in
:mod:`mla_passes.passes.fusion_raw` and :mod:`mla_passes.passes.fusion_fused_rope`
(shared steps: :mod:`mla_passes.passes.fusion_plan`), the checks before the
rewrite in :mod:`mla_passes.passes.fusion_checks`, the rewrite in
:mod:`mla_passes.passes.fusion_rewrite`, the attention swap both passes make
in :mod:`mla_passes.passes.attention`.
"""

from __future__ import annotations

import logging
from collections import Counter

from torch.fx import Graph

from .. import fx
from ..kernels import validate
from ..op_handles import op_handles
from ..patterns import _engine, casts, qk_rope_kvcache, rope
from ..vllm import tables as vllm_tables
from . import attention, fusion_checks, fusion_fused_rope, fusion_plan, fusion_raw, fusion_rewrite
from .attention import describe_layer
from .base import MLAGraphPass
from .fusion_plan import FusionPlan

logger = logging.getLogger(__name__)


class MLAQkRopeKVCacheFusionPass(MLAGraphPass):
    """Fuse RoPE + KV-cache write + decode q-prep per MLA layer (see module doc)."""

    name = "mla_qk_rope_kvcache_fusion"

    def __init__(self, *, backend: str = "auto", raw_form: bool = True, gate=None):
        super().__init__(gate=gate)
        self.backend = backend
        self.raw_form = raw_form
        self.pattern_counts: Counter = Counter()  # per registered pattern, over the layers rewritten last call

    def source_modules(self) -> list:
        return super().source_modules() + [rope, casts, qk_rope_kvcache, _engine, fx, validate, attention,
                                           vllm_tables, fusion_plan, fusion_raw, fusion_fused_rope,
                                           fusion_checks, fusion_rewrite]

    def apply(self, graph: Graph) -> int:
        handles = op_handles()
        self.pattern_counts = Counter()
        hits = qk_rope_kvcache.match(graph, handles)  # registered patterns first (DESIGN §3)
        updates, attns = _calls_by_layer(hits, handles)
        if not updates:
            return 0
        order = fx.NodeOrder()  # stays valid while earlier layers' rewrites insert nodes
        mode = fx.graph_fake_mode(graph)
        count = 0
        for ln, ups in updates.items():
            where = f"layer {describe_layer(ln)}"
            ats = attns.get(ln, [])
            if len(ups) != 1 or len(ats) != 1:
                self.refuse(where, "%d cache update(s) and %d attention call(s) use this layer_name",
                            len(ups), len(ats))
                continue
            up, attn = ups[0], ats[0]
            plan = self.guarded(where, self._plan, hits, up, attn, ln, where, order, handles)
            if plan is None:
                continue
            fusion_rewrite.rewrite(graph, plan, self.backend, mode)
            plan.patterns += (qk_rope_kvcache.anchor_name(up), qk_rope_kvcache.anchor_name(attn))
            self.pattern_counts.update(plan.patterns)
            logger.debug("%s: %s matched by %s", self.name, where, ", ".join(plan.patterns))
            count += 1
        return count

    def _plan(self, hits, up, attn, ln, where, order, handles) -> FusionPlan | None:
        """The checked plan for one layer, or None (refused). Reads the graph only."""
        if up.op in handles.fused_rope:
            plan = fusion_fused_rope.FusedRopePlanner(self, hits).plan(up, attn, ln, where)
        elif not self.raw_form:
            self.refuse(where, "raw RoPE form and fuse_rope_kvcache_cat_mla is off")
            return None
        else:
            plan = fusion_raw.RawFormPlanner(self, hits).plan(up, attn, ln, where, order)
        if (plan is None or not fusion_checks.kernel_rules(self, plan, where)
                or not fusion_checks.in_place_safe(self, plan, where)):
            return None
        return plan


def _calls_by_layer(hits, handles) -> tuple[dict, dict]:
    """The anchored cache updates (or fused-rope calls) and attentions, each by ``layer_name``."""
    attns: dict = {}
    updates: dict = {}
    for c in qk_rope_kvcache.anchor_calls(hits, handles):
        if c.op in handles.attention:
            attns.setdefault(c.arg("layer_name"), []).append(c)
        else:
            updates.setdefault(c.arg("layer_name"), []).append(c)
    return updates, attns
