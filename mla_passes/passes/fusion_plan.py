"""One layer's plan for the QK-RoPE / KV-cache fusion
(:mod:`mla_passes.passes.fusion`), and the planning steps both graph forms
share.

A :class:`FusionPlan` says what the rewrite
(:mod:`mla_passes.passes.fusion_rewrite`) inserts, which values it replaces by
views of the rotated memory and which nodes it erases. The planners read the
graph only: :class:`LayerPlanner` holds the shared steps (the attention's
checks and layer state, the ``slice_scatter`` behind its q, the rotated q_pe
it writes), :mod:`mla_passes.passes.fusion_raw` and
:mod:`mla_passes.passes.fusion_fused_rope` the two forms (DESIGN §3). A
refusal goes to the pass (:meth:`mla_passes.passes.base.MLAGraphPass.refuse`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Node

from .. import fx
from .attention import check_attention, layer_state_for

aten = torch.ops.aten
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


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


def last_dim(dim, ndim) -> bool:
    """Whether ``dim`` is the last of ``ndim`` dims."""
    return dim == -1 or dim == ndim - 1


def is_slice_scatter(n) -> bool:
    """Whether ``n`` is an ``aten.slice_scatter`` node."""
    return isinstance(n, Node) and n.op == "call_function" and n.target is aten.slice_scatter.default


def ss_args(n: Node):
    """``(base, src, dim, start, end, step)`` of ``slice_scatter`` ``n``, defaults filled in."""
    a = list(n.args) + [None] * (6 - len(n.args))
    base, src, dim, start, end, step = a[:6]
    dim = n.kwargs.get("dim", 0 if dim is None else dim)
    start = n.kwargs.get("start", start)
    end = n.kwargs.get("end", end)
    step = n.kwargs.get("step", 1 if step is None else step)
    return base, src, dim, start, end, step


def ss_region(n: Node):
    """Region that ``slice_scatter`` ``n`` writes, in its base's memory."""
    base, src, dim, start, end, step = ss_args(n)
    bv = fx.val(base)
    if step != 1 or not last_dim(dim, bv.dim()):
        return None
    rb = fx.Region.of(base)
    return rb.slice_last(start or 0, end if end is not None else 2**63 - 1)


class LayerPlanner:
    """The planning steps both graph forms share. ``pass_`` takes the
    refusals; ``hits`` are the graph's registered-pattern matches (DESIGN §3)."""

    def __init__(self, pass_, hits):
        self.pass_ = pass_
        self.hits = hits

    def refuse(self, where, why: str, *args) -> None:
        self.pass_.refuse(where, why, *args)

    def common(self, attn: fx.OpCall, ln, where, kv_c, kv_cache_dtype):
        """Checks both graph forms share; the layer's state, or None (refused)."""
        why = check_attention(attn)
        if why:
            self.refuse(where, why)
            return None
        if attn.arg("kv_c_normed") is not kv_c:
            self.refuse(where, "the attention reads another kv_c than the cache update writes")
            return None
        state = layer_state_for(self.pass_, ln, where)
        if state is not None and kv_cache_dtype != state.kv_cache_dtype:
            self.refuse(where, "graph kv_cache_dtype %r != layer state's %r", kv_cache_dtype, state.kv_cache_dtype)
            return None
        return state

    def q_from_attention(self, attn, where, R):
        """(slice_scatter, base, P) behind the attention's q, or None."""
        q = attn.arg("q")
        qv = fx.val(q)
        while not is_slice_scatter(q) and q.op == "call_function" and q.target in RESHAPES:
            q = q.args[0]  # view(view(slice_scatter)) back to the same shape
        if is_slice_scatter(q) and (tuple(fx.val(q).shape) != tuple(qv.shape)
                                     or tuple(fx.val(q).stride()) != tuple(qv.stride())):
            q = None
        if not is_slice_scatter(q):
            self.refuse(where, "attention q is not a slice_scatter of rotated q_pe into q")
            return None
        base, src, dim, start, end, step = ss_args(q)
        bv = fx.val(base)
        if step != 1 or not last_dim(dim, bv.dim()) or bv.dim() != 3:
            self.refuse(where, "q slice_scatter is not along the last dim of [T, H, P+R]")
            return None
        P = int(start)
        if bv.shape[-1] != P + R:
            self.refuse(where, "q head dim %s != P %d + R %d", bv.shape[-1], P, R)
            return None
        return q, base, P

    def src_value(self, ss: Node, region):
        """The rotated q_pe written by ``ss`` (through a ``copy`` into a slice of
        the same memory), and the copy node if any."""
        hit = self.hits.at(ss, "q_pe_scatter") if self.hits is not None else None
        if hit is not None and fx.Region.of(hit["q_pe_dest"]) == region:
            return hit["q_pe_rot"], hit.root.args[1]
        src = ss_args(ss)[1]
        if isinstance(src, Node) and src.target is aten.copy.default:
            dest = src.args[0]
            if fx.Region.of(dest) != region or len(src.users) != 1:
                return None, None
            return src.args[1], src
        return src, None
