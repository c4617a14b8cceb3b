"""QK-RoPE / KV-cache / q-absorb / q-cat / q-quant fusion.

Per MLA layer (the cache-update node and the attention node paired by their
``layer_name`` graph input), replaces RoPE + KV-cache write + the decode
q-prep inside the attention with one ``mla_passes::mla_fused_decode_prep``
and the attention with ``mla_passes::mla_attention_with_prepped_q``::

    # raw form (vLLM on CPU)                      # fused-rope form (vLLM's own MLA rope/kv pass)
    q_pe_rot, k_pe_rot = <RoPE aten ops>(q, k)   fr = auto_functionalized(fused_rope_unified_mla_kv_cache_update,
    dep = unified_mla_kv_cache_update(                positions, q_pe=slice(q, P:), k_pe=k, kv_c, cos_sin, ...)
              kv_c, k_pe_rot, ln, dt, k_scale)    q_new = slice_scatter(q, copy(slice(q), fr[1]), -1, P)
    q_new = slice_scatter(q, copy(slice(q), q_pe_rot), -1, P)
    af = auto_functionalized(unified_mla_attention_with_output, q=q_new, kv_c_normed=kv_c,
             k_pe=k_pe_rot, output=out, layer_name=ln, kv_cache_dummy_dep=dep)
    # after
    qp = mla_passes.mla_fused_decode_prep(q, kv_c, k, positions, cos_sin, is_neox, ln, out_dtype, backend,
                                          kv_cache_dtype, k_scale)   # the graph's cache-update operands
    mla_passes.mla_attention_with_prepped_q(q, qp, kv_c, k.unsqueeze(1), out, ln, None)

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
"""

from __future__ import annotations

import contextlib
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node

from .. import fx
from ..kernels import validate
from ..op_handles import op_handles
from ..patterns import _engine, casts, qk_rope_kvcache, rope
from .base import MLAGraphPass, logger
from .lift import check_attention, describe_layer, layer_state_for, replace_attention

FUSED = torch.ops.mla_passes.mla_fused_decode_prep.default
aten = torch.ops.aten
_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


@dataclass
class FusionPlan:
    ln: Node
    attn: fx.OpCall
    update: fx.OpCall
    q_orig: Node
    k_in: Node
    kv_c: Node
    positions: Node
    cos_sin_cache: Node
    is_neox: bool
    kv_cache_dtype: str
    k_scale: Node
    out_dtype: torch.dtype
    P: int
    R: int
    insert_before: Node
    q_value_nodes: list = field(default_factory=list)   # nodes whose value == mutated q (whole)
    q_pe_value_nodes: list = field(default_factory=list)  # nodes whose value == rotated q_pe
    k_value_nodes: list = field(default_factory=list)   # nodes whose value == rotated k_pe
    root_value_nodes: list = field(default_factory=list)  # (node, base): value == mutated base
    dead: list = field(default_factory=list)            # to erase explicitly
    cone: set = field(default_factory=set)
    patterns: tuple = ()                                # registered patterns (or "rope_semantic") used
    q_scale: object = None                              # the layer state's (checked by the kernel's rule)
    k_scale_f32: bool = False                           # pass float32(k_scale): an exact copy (bf16/fp16)


def _last_dim(dim, ndim) -> bool:
    return dim == -1 or dim == ndim - 1


def _is_slice_scatter(n) -> bool:
    return isinstance(n, Node) and n.op == "call_function" and n.target is aten.slice_scatter.default


def _ss_args(n: Node):
    a = list(n.args) + [None] * (6 - len(n.args))
    base, src, dim, start, end, step = a[:6]
    dim = n.kwargs.get("dim", 0 if dim is None else dim)
    start = n.kwargs.get("start", start)
    end = n.kwargs.get("end", end)
    step = n.kwargs.get("step", 1 if step is None else step)
    return base, src, dim, start, end, step


def _ss_region(n: Node):
    """Region that ``slice_scatter`` ``n`` writes, in its base's memory."""
    base, src, dim, start, end, step = _ss_args(n)
    bv = fx.val(base)
    if step != 1 or not _last_dim(dim, bv.dim()):
        return None
    rb = fx.Region.of(base)
    return rb.slice_last(start or 0, end if end is not None else 2**63 - 1)


class MLAQkRopeKVCacheFusionPass(MLAGraphPass):
    """Fuse RoPE + KV-cache write + decode q-prep per MLA layer (see module doc)."""

    name = "mla_qk_rope_kvcache_fusion"

    def __init__(self, *, backend: str = "auto", raw_form: bool = True, gate=None):
        super().__init__(gate=gate)
        self.backend = backend
        self.raw_form = raw_form
        self.pattern_counts: Counter = Counter()  # per registered pattern, over the layers rewritten last call
        self._hits = None

    def source_modules(self) -> list:
        import sys

        return super().source_modules() + [rope, casts, qk_rope_kvcache, _engine, fx, validate,
                                           sys.modules[check_attention.__module__]]

    def apply(self, graph: Graph) -> int:
        handles = op_handles()
        attns: dict = {}
        updates: dict = {}
        self.pattern_counts = Counter()
        self._hits = qk_rope_kvcache.match(graph, handles)  # registered patterns first (DESIGN §3)
        for c in qk_rope_kvcache.anchor_calls(self._hits, handles):
            if c.op in handles.attention:
                attns.setdefault(c.arg("layer_name"), []).append(c)
            else:
                updates.setdefault(c.arg("layer_name"), []).append(c)
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
            plan = self.guarded(where, self._plan, up, attn, ln, where, order, handles)
            if plan is None:
                continue
            self._rewrite(graph, plan, mode)
            plan.patterns += (qk_rope_kvcache.anchor_name(up), qk_rope_kvcache.anchor_name(attn))
            self.pattern_counts.update(plan.patterns)
            logger.debug("%s: %s matched by %s", self.name, where, ", ".join(plan.patterns))
            count += 1
        return count

    def _plan(self, up, attn, ln, where, order, handles) -> FusionPlan | None:
        """The checked plan for one layer, or None (refused). Reads the graph only."""
        if up.op in handles.fused_rope:
            plan = self._plan_fused_rope(up, attn, ln, where)
        elif not self.raw_form:
            self.refuse(where, "raw RoPE form and fuse_rope_kvcache_cat_mla is off")
            return None
        else:
            plan = self._plan_raw(up, attn, ln, where, order)
        if plan is None or not self._kernel_rules(plan, where) or not self._safe(plan, where):
            return None
        return plan

    def _kernel_rules(self, plan: FusionPlan, where: str) -> bool:
        """The kernel's own argument rules (:mod:`mla_passes.kernels.validate`,
        one source for both) asked at compile time about the operands the
        fused op will get, so that a graph the kernel refuses at run time is
        not rewritten. A bf16/fp16 ``k_scale`` (``model.half()`` of a float32
        buffer) has an exact float32 copy: the plan passes that instead."""
        q = fx.val(plan.q_orig)
        k_scale = fx.val(plan.k_scale)
        if (isinstance(k_scale, torch.Tensor) and k_scale.is_floating_point() and k_scale.dtype != torch.float32
                and casts.holds(torch.float32, k_scale.dtype)):
            plan.k_scale_f32 = True
            mode = getattr(k_scale, "fake_mode", None)
            with mode if mode is not None else contextlib.nullcontext():
                k_scale = k_scale.to(torch.float32)
        operands = (q, fx.val(plan.kv_c), fx.val(plan.k_in), fx.val(plan.positions), fx.val(plan.cos_sin_cache))
        if not all(isinstance(v, torch.Tensor) for v in operands + (k_scale,)):
            self.refuse(where, "an operand of the fused op has no tensor value in the graph")
            return False
        problem = validate.graph_operand_problem(*operands, plan.is_neox, plan.kv_cache_dtype, k_scale,
                                                 P=plan.P, R=plan.R)
        if problem is None and isinstance(plan.q_scale, torch.Tensor):
            problem = validate.scale_problem("q_scale", plan.q_scale, q.device, optional=True)
        if problem is not None:
            self.refuse(where, "the kernel would refuse the layer's operands: %s", validate.problem_text(problem))
            return False
        return True

    # --- planning ----------------------------------------------------------------
    def _common(self, attn: fx.OpCall, ln, where, kv_c, kv_cache_dtype):
        """Checks both graph forms share; the layer's state, or None (refused)."""
        why = check_attention(attn)
        if why:
            self.refuse(where, why)
            return None
        if attn.arg("kv_c_normed") is not kv_c:
            self.refuse(where, "the attention reads another kv_c than the cache update writes")
            return None
        state = layer_state_for(self, ln, where)
        if state is not None and kv_cache_dtype != state.kv_cache_dtype:
            self.refuse(where, "graph kv_cache_dtype %r != layer state's %r", kv_cache_dtype, state.kv_cache_dtype)
            return None
        return state

    def _q_from_attention(self, attn, where, R):
        """(slice_scatter, base, P) behind the attention's q, or None."""
        q = attn.arg("q")
        qv = fx.val(q)
        while not _is_slice_scatter(q) and q.op == "call_function" and q.target in _RESHAPES:
            q = q.args[0]  # view(view(slice_scatter)) back to the same shape
        if _is_slice_scatter(q) and (tuple(fx.val(q).shape) != tuple(qv.shape)
                                     or tuple(fx.val(q).stride()) != tuple(qv.stride())):
            q = None
        if not _is_slice_scatter(q):
            self.refuse(where, "attention q is not a slice_scatter of rotated q_pe into q")
            return None
        base, src, dim, start, end, step = _ss_args(q)
        bv = fx.val(base)
        if step != 1 or not _last_dim(dim, bv.dim()) or bv.dim() != 3:
            self.refuse(where, "q slice_scatter is not along the last dim of [T, H, P+R]")
            return None
        P = int(start)
        if bv.shape[-1] != P + R:
            self.refuse(where, "q head dim %s != P %d + R %d", bv.shape[-1], P, R)
            return None
        return q, base, P

    def _src_value(self, ss: Node, region):
        """The rotated q_pe written by ``ss`` (through a ``copy`` into a slice of
        the same memory), and the copy node if any."""
        hit = self._hits.at(ss, "q_pe_scatter") if self._hits is not None else None
        if hit is not None and fx.Region.of(hit["q_pe_dest"]) == region:
            return hit["q_pe_rot"], hit.root.args[1]
        src = _ss_args(ss)[1]
        if isinstance(src, Node) and src.target is aten.copy.default:
            dest = src.args[0]
            if fx.Region.of(dest) != region or len(src.users) != 1:
                return None, None
            return src.args[1], src
        return src, None

    def _plan_raw(self, up: fx.OpCall, attn: fx.OpCall, ln, where, order=None) -> FusionPlan | None:
        kv_c, k_rot = up.arg("kv_c_normed"), up.arg("k_pe")
        state = self._common(attn, ln, where, kv_c, up.arg("kv_cache_dtype"))
        if state is None:
            return None
        if attn.arg("k_pe") is not k_rot:
            self.refuse(where, "the attention reads another k_pe than the cache update writes")
            return None
        if attn.arg("kv_cache_dummy_dep") is not up.node or set(up.node.users) != {attn.node}:
            self.refuse(where, "the cache update's token is not (only) the attention's kv_cache_dummy_dep")
            return None
        R = int(fx.val(k_rot).shape[-1])
        got = self._q_from_attention(attn, where, R)
        if got is None:
            return None
        ss, base, P = got
        q_pe_region = fx.Region.of(base).slice_last(P, P + R)
        q_rot, copy = self._src_value(ss, q_pe_region)
        if q_rot is None:
            self.refuse(where, "q slice_scatter source is not a copy into q[..., P:]")
            return None
        # other users of the rotated q (and of q_rot) are rewired to q after the fused op
        m = qk_rope_kvcache.rope_for_layer(self._hits, q_rot, k_rot, q_pe_region, R)
        if m is not None:  # the patterns' user counts keep their intermediates private
            cone = m.cone | {q_rot, k_rot}
            used = m.pattern_names + (("q_pe_scatter",) if self._hits.at(ss, "q_pe_scatter") else ())
        else:  # no registered form: the semantic check, held to the dtype's rounding
            cone = rope.private_cone([q_rot, k_rot], {up.node, attn.node})
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

    def _plan_fused_rope(self, up: fx.OpCall, attn: fx.OpCall, ln, where) -> FusionPlan | None:
        if up.form != "v1":
            self.refuse(where, "fused-rope op in %s form (only auto_functionalized v1 is handled)", up.form)
            return None
        kv_c = up.arg("kv_c")
        state = self._common(attn, ln, where, kv_c, up.arg("kv_cache_dtype"))
        if state is None:
            return None
        q_pe, k_in = up.arg("q_pe"), up.arg("k_pe")
        R = int(fx.val(k_in).shape[-1])
        dep, q_new, k_new = (up.output_users(i) for i in range(3))
        if attn.arg("kv_cache_dummy_dep") not in dep or any(set(d.users) - {attn.node} for d in dep):
            self.refuse(where, "the fused-rope token is not (only) the attention's kv_cache_dummy_dep")
            return None
        got = self._q_from_attention(attn, where, R)
        if got is None:
            return None
        ss, base, P = got
        q_pe_region = fx.Region.of(base).slice_last(P, P + R)
        if fx.Region.of(q_pe) != q_pe_region:
            self.refuse(where, "fused-rope q_pe is not q[..., P:] of the attention's q")
            return None
        q_orig = base
        if (q_pe.op == "call_function" and q_pe.target is aten.slice.Tensor
                and fx.Region.of(q_pe.args[0]) == fx.Region.of(base)):
            q_orig = q_pe.args[0]  # the q the op read (defined before it; base may be regenerated after)
        src, copy = self._src_value(ss, q_pe_region)
        if src is None or src not in q_new:
            self.refuse(where, "attention q is not built from the fused-rope op's rotated q_pe")
            return None
        k_region = fx.Region.of(k_in)
        root_values, dead = [], [n for n in (copy, ss, up.node) if n is not None]
        k_values = []
        for gi in k_new:
            k_values.append(gi)
            for u in gi.users:
                if _is_slice_scatter(u) and _ss_args(u)[1] is gi and _ss_region(u) == k_region:
                    root_values.append((u, _ss_args(u)[0]))
        if not self._reads_rotated_k(attn.arg("k_pe"), k_values, root_values, k_region):
            self.refuse(where, "the attention reads another k_pe than the fused-rope op rotates")
            return None
        # other readers of the new q_pe value: users of q_new getitems besides ss/copy
        q_pe_values = list(q_new)
        dead += list(dep) + list(q_new) + list(k_new)
        return FusionPlan(
            ln=ln, attn=attn, update=up, q_orig=q_orig, k_in=k_in, kv_c=kv_c, positions=up.arg("positions"),
            cos_sin_cache=up.arg("cos_sin_cache"), is_neox=bool(up.arg("is_neox")),
            kv_cache_dtype=up.arg("kv_cache_dtype"), k_scale=up.arg("kv_cache_scale"),
            out_dtype=state.q_out_dtype(fx.val(base).dtype), P=P, R=R, insert_before=up.node,
            q_value_nodes=[ss], q_pe_value_nodes=q_pe_values, k_value_nodes=k_values,
            root_value_nodes=root_values, dead=dead, cone=set(),
            patterns=("fused_rope_q_scatter",) if self._hits.at(ss, "fused_rope_q_scatter") else (),
            q_scale=state.q_scale,
        )

    @staticmethod
    def _reads_rotated_k(k_attn: Node, k_values: list, root_values: list, k_region) -> bool:
        """Whether ``k_attn`` (through views) holds exactly the rotated k_pe:
        the elements of a rotated-k getitem, or the k region of a mutated
        base regenerated by ``slice_scatter`` after the fused-rope op."""
        if not isinstance(k_attn, Node):
            return False
        r = fx.Region.of(k_attn)
        if r is None:
            return False
        for gi in k_values:
            if r.root is gi:
                return r.same_elements(fx.Region.of(gi))
        for ss, base in root_values:
            if r.root is ss:
                rb, rs = fx.Region.of(base), fx.Region.of(ss)
                if (rb.size, rb.stride, rb.offset) != (rs.size, rs.stride, rs.offset):
                    return False  # base and regenerated base laid out differently
                return r.same_elements(fx.Region(ss, k_region.size, k_region.stride, k_region.offset))
        return False

    # --- safety ---------------------------------------------------------------------
    def _safe(self, plan: FusionPlan, where: str) -> bool:
        """Every input exists before the fusion point; every value the rewrite
        replaces by a view of the rotated memory has that view's dtype; no
        reader of the memory the fused op rotates runs after it expecting
        unrotated values."""
        at = plan.insert_before
        for inp in (plan.q_orig, plan.k_in, plan.kv_c, plan.positions, plan.cos_sin_cache, plan.k_scale):
            if not isinstance(inp, Node) or not inp < at:
                self.refuse(where, "input %s is not a graph value defined before the fusion point", inp)
                return False
        for n, base in plan.root_value_nodes:
            if not base < at:
                self.refuse(where, "mutated base %s is defined after the fusion point", base.name)
                return False
        if not self._same_dtypes(plan, where):
            return False
        going = set(plan.dead) | plan.cone | {plan.attn.node, plan.update.node}
        going |= set(plan.q_value_nodes) | {n for n, _ in plan.root_value_nodes}
        for target in (fx.Region.of(plan.q_orig).slice_last(plan.P, plan.P + plan.R), fx.Region.of(plan.k_in)):
            root = target.root
            if root.op == "placeholder":
                self.refuse(where, "would rotate graph input %s in place", root.name)
                return False
            shared = fx.aliases(root)
            alias_set = set(shared)
            for a in shared:
                r = False  # Region.of(a), computed at the first reader that needs it
                for u in a.users:
                    if u in going or u in alias_set or u < at:
                        continue
                    if u.op == "output":
                        self.refuse(where, "rotated memory %s is a graph output", a.name)
                        return False
                    if r is False:
                        r = fx.Region.of(a)
                    if r is not None and r.disjoint_columns(target):
                        continue
                    self.refuse(where, "%s reads %s after the fusion point", u.name, a.name)
                    return False
        return True

    def _same_dtypes(self, plan: FusionPlan, where: str) -> bool:
        """The rewrite replaces rotated values by views of the rotated q / k
        memory: refuse when a kept reader would get another dtype (an fp32
        RoPE result rounded to the model dtype is not the same value)."""
        k_dtype, q_dtype = fx.val(plan.k_in).dtype, fx.val(plan.q_orig).dtype
        keep = set(plan.dead) | set(plan.q_value_nodes) | plan.cone
        checks = [(n, k_dtype) for n in plan.k_value_nodes if set(n.users) - {plan.update.node}]
        checks.append((plan.attn.arg("k_pe"), k_dtype))
        checks += [(n, q_dtype) for n in plan.q_pe_value_nodes if set(n.users) - keep]
        for n, dtype in checks:
            v = fx.val(n)
            if not isinstance(v, torch.Tensor) or v.dtype != dtype:
                self.refuse(where, "%s holds a rotated value as %s; after the rewrite it would be %s", n,
                            getattr(v, "dtype", v), dtype)
                return False
        return True

    # --- rewriting --------------------------------------------------------------------
    def _rewrite(self, graph: Graph, plan: FusionPlan, mode=None) -> None:
        with graph.inserting_before(plan.insert_before):
            k_scale = plan.k_scale
            if plan.k_scale_f32:  # exact: every bf16/fp16 value is a float32 value
                k_scale = fx.call(graph, torch.ops.prims.convert_element_type.default, (k_scale, torch.float32),
                                   fake_mode=mode)
            qp = fx.call(graph, FUSED, (plan.q_orig, plan.kv_c, plan.k_in, plan.positions, plan.cos_sin_cache,
                                        plan.is_neox, plan.ln, plan.out_dtype, self.backend, plan.kv_cache_dtype,
                                        k_scale), fake_mode=mode)
        views: dict = {}
        cursor = [qp]

        def view_like(src: Node, like: Node) -> Node:
            """A view of (mutated) ``src`` shaped like ``like``, placed after the fused op."""
            shape = tuple(fx.val(like).shape)
            key = (src, tuple(map(str, shape)))
            if key in views:
                return views[key]
            sv = fx.val(src)
            if tuple(map(str, sv.shape)) == key[1]:
                views[key] = src
                return src
            with graph.inserting_after(cursor[0]):
                if sv.dim() + 1 == len(shape) and shape[1] == 1:
                    out = fx.call(graph, aten.unsqueeze.default, (src, 1), fake_mode=mode)
                elif sv.dim() == len(shape) + 1 and sv.shape[1] == 1:
                    out = fx.call(graph, aten.squeeze.dim, (src, 1), fake_mode=mode)
                else:
                    # token dim first, static trailing dims (a SymInt cannot be an FX constant)
                    out = fx.call(graph, aten.reshape.default, (src, [-1] + [int(d) for d in shape[1:]]),
                                   fake_mode=mode)
            cursor[0] = out
            views[key] = out
            return out

        attn = plan.attn
        k_for_attn = view_like(plan.k_in, attn.arg("k_pe"))
        for n in plan.k_value_nodes:
            for u in list(n.users):
                if u is attn.node or u is plan.update.node or (u.op == "call_function" and _is_slice_scatter(u)
                                                               and any(u is r for r, _ in plan.root_value_nodes)):
                    continue
                u.replace_input_with(n, view_like(plan.k_in, n))
        for ss, base in plan.root_value_nodes:
            ss.replace_all_uses_with(base)
        q_pe_view = None
        for n in plan.q_pe_value_nodes:
            for u in list(n.users):
                if u in plan.dead or u in plan.q_value_nodes or u in plan.cone:
                    continue
                if q_pe_view is None:
                    with graph.inserting_after(cursor[0]):
                        q_pe_view = fx.call(graph, aten.slice.Tensor, (plan.q_orig, -1, plan.P, plan.P + plan.R),
                                             fake_mode=mode)
                    cursor[0] = q_pe_view
                u.replace_input_with(n, q_pe_view)
        for n in plan.q_value_nodes:
            for u in list(n.users):
                if u is not attn.node:
                    u.replace_input_with(n, plan.q_orig)
        replace_attention(graph, attn, plan.q_orig, qp, plan.kv_c, k_for_attn, None, fake_mode=mode)
        for n in plan.dead:
            if n.graph is graph and n.target is operator.getitem:
                for u in list(n.users):
                    if not u.users and u.target is operator.getitem:
                        graph.erase_node(u)
        erased = fx.erase_dead(graph, list(plan.dead) + [n for n, _ in plan.root_value_nodes] + list(plan.cone))
        leftover = [n for n in plan.dead if n not in erased]
        if leftover:
            raise AssertionError(f"mla fusion left {leftover} in the graph")
