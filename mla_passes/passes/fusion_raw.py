"""The raw-form plan of the QK-RoPE / KV-cache fusion (DESIGN §3, "Raw
form"): RoPE written out in aten ops between q/k and vLLM's KV-cache update
op, and the rotated q_pe copied back into q by ``slice_scatter``.

The RoPE is found by the registered patterns of
:mod:`mla_passes.patterns.qk_rope_kvcache`; a RoPE none of them covers goes
to the semantic check of :mod:`mla_passes.patterns.rope`, held to the
dtype's rounding (:mod:`mla_passes.patterns.casts`).
"""

from __future__ import annotations

from .. import fx
from ..patterns import casts, qk_rope_kvcache, rope
from .fusion_plan import FusionPlan, LayerPlanner


class RawFormPlanner(LayerPlanner):
    """The plan for one layer in the raw form, or None (refused)."""

    def plan(self, up: fx.OpCall, attn: fx.OpCall, ln, where, order=None) -> FusionPlan | None:
        kv_c, k_rot = up.arg("kv_c_normed"), up.arg("k_pe")
        state = self.common(attn, ln, where, kv_c, up.arg("kv_cache_dtype"))
        if state is None:
            return None
        if attn.arg("k_pe") is not k_rot:
            self.refuse(where, "the attention reads another k_pe than the cache update writes")
            return None
        if attn.arg("kv_cache_dummy_dep") is not up.node or set(up.node.users) != {attn.node}:
            self.refuse(where, "the cache update's token is not (only) the attention's kv_cache_dummy_dep")
            return None
        R = int(fx.val(k_rot).shape[-1])
        got = self.q_from_attention(attn, where, R)
        if got is None:
            return None
        ss, base, P = got
        q_pe_region = fx.Region.of(base).slice_last(P, P + R)
        q_rot, copy = self.src_value(ss, q_pe_region)
        if q_rot is None:
            self.refuse(where, "q slice_scatter source is not a copy into q[..., P:]")
            return None
        # other users of the rotated q (and of q_rot) are rewired to q after the fused op
        m = qk_rope_kvcache.rope_for_layer(self.hits, q_rot, k_rot, q_pe_region, R)
        if m is not None:  # the patterns' user counts keep their intermediates private
            cone = m.cone | {q_rot, k_rot}
            used = m.pattern_names + (("q_pe_scatter",) if self.hits.at(ss, "q_pe_scatter") else ())
        else:  # no registered form: the semantic check, held to the dtype's rounding
            got = self._semantic_rope(q_rot, k_rot, base, q_pe_region, R, {up.node, attn.node}, where, order)
            if got is None:
                return None
            m, cone = got
            used = ("rope_semantic",)
        return FusionPlan(
            ln=ln, attn=attn, update=up, q_orig=base, k_in=m.k_in, kv_c=kv_c, positions=m.positions,
            cos_sin_cache=m.cos_sin_cache, is_neox=m.is_neox, kv_cache_dtype=up.arg("kv_cache_dtype"),
            k_scale=up.arg("k_scale"), out_dtype=state.q_out_dtype(fx.val(base).dtype),
            P=P, R=R, insert_before=up.node,
            q_value_nodes=[ss], q_pe_value_nodes=[q_rot], k_value_nodes=[k_rot],
            dead=[n for n in (copy, ss, up.node) if n is not None], cone=cone, patterns=used,
            q_scale=state.q_scale,
        )

    def _semantic_rope(self, q_rot, k_rot, base, q_pe_region, R, readers, where, order):
        """``(match, cone)``: the :class:`mla_passes.patterns.rope.RopeMatch`
        the semantic check finds between q/k and ``q_rot``/``k_rot``, and its
        private subgraph; or None (refused). ``readers``: the layer's cache update
        and attention, the cone's allowed users outside it."""
        cone = rope.private_cone([q_rot, k_rot], readers)
        if cone is None:
            self.refuse(where, "no RoPE subgraph")
            return None
        # a cone node (other than the outputs) with a user outside is a shared intermediate
        for n in cone:
            if n is q_rot or n is k_rot:
                continue
            for u in n.users:
                if u not in cone:
                    self.refuse(where, "RoPE intermediate %s has another user %s", n.name, u.name)
                    return None
        q_root = fx.root_of(base)
        m = rope.extract(cone, q_root, R, order)
        if isinstance(m, str):
            self.refuse(where, "not RoPE at one positions value of one cos/sin table: %s", m)
            return None
        if q_root not in m.leaves:
            # the fused op rotates base[..., P:] in place: the RoPE must read it from there
            self.refuse(where, "the RoPE does not read q_pe from the q (%s) it writes back into", q_root.name)
            return None
        foreign = rope.foreign_op(m)
        if foreign is not None:
            # an op the numbers cannot rule out (a clip, nan_to_num, ...): DESIGN §3, "The semantic check"
            self.refuse(where, "the RoPE subgraph holds %s, not one of the operations a rotation is built "
                        "from (gather, multiply, add/subtract, negate, concatenate/interleave, views, casts)",
                        rope.describe_op(foreign))
            return None
        bad = rope.narrowing_cast(m)
        if bad is not None:
            self.refuse(where, "the RoPE rounds through the cast %s, which the fused op would drop",
                        casts.describe(bad))
            return None
        if not rope.verify(m, q_pe_region, q_rot, k_rot, R):
            self.refuse(where, "subgraph between q/k and the cache update does not compute RoPE")
            return None
        return m, cone
