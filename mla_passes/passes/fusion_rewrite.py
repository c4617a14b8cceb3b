"""The rewrite of one planned layer of the QK-RoPE / KV-cache fusion
(:mod:`mla_passes.passes.fusion`; DESIGN §4.6, "Apply"): insert
``mla_passes::mla_fused_decode_prep`` at the fusion point, rewire every
value the plan names to views of the rotated memory (placed after the fused
op), swap the attention (:func:`mla_passes.passes.attention.replace_attention`)
and erase what the plan leaves dead. Runs only on a checked plan: an error
here is a bug, not a refusal.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

from .. import fx
from .attention import replace_attention
from .fusion_plan import FusionPlan, is_slice_scatter

FUSED = torch.ops.mla_passes.mla_fused_decode_prep.default
aten = torch.ops.aten


def rewrite(graph: Graph, plan: FusionPlan, backend: str, mode=None) -> None:
    """Apply ``plan`` to ``graph`` (``mode``: the graph's fake mode)."""
    qp = _insert_fused(graph, plan, backend, mode)
    views = _Views(graph, qp, mode)
    attn = plan.attn
    k_for_attn = views.like(plan.k_in, attn.arg("k_pe"))
    _rewire_k(plan, views)
    _rewire_q(plan, views)
    replace_attention(graph, attn, plan.q_orig, qp, plan.kv_c, k_for_attn, None, fake_mode=mode)
    _erase(graph, plan)


def _insert_fused(graph: Graph, plan: FusionPlan, backend: str, mode) -> Node:
    """The fused op (and the float32 copy of ``k_scale`` if the plan asks), before the fusion point."""
    with graph.inserting_before(plan.insert_before):
        k_scale = plan.k_scale
        if plan.k_scale_f32:  # exact: every bf16/fp16 value is a float32 value
            k_scale = fx.call(graph, torch.ops.prims.convert_element_type.default, (k_scale, torch.float32),
                              fake_mode=mode)
        return fx.call(graph, FUSED, (plan.q_orig, plan.kv_c, plan.k_in, plan.positions, plan.cos_sin_cache,
                                      plan.is_neox, plan.ln, plan.out_dtype, backend, plan.kv_cache_dtype,
                                      k_scale), fake_mode=mode)


class _Views:
    """Views of the mutated tensors, placed one after another after the fused op, one per (source, shape)."""

    def __init__(self, graph: Graph, fused: Node, mode):
        self.graph, self.mode = graph, mode
        self.views: dict = {}
        self.cursor = fused

    def after(self, target, args) -> Node:
        """A new call placed after the last view (or the fused op)."""
        with self.graph.inserting_after(self.cursor):
            self.cursor = fx.call(self.graph, target, args, fake_mode=self.mode)
        return self.cursor

    def like(self, src: Node, like: Node) -> Node:
        """A view of (mutated) ``src`` shaped like ``like``, placed after the fused op."""
        shape = tuple(fx.val(like).shape)
        key = (src, tuple(map(str, shape)))
        if key in self.views:
            return self.views[key]
        sv = fx.val(src)
        if tuple(map(str, sv.shape)) == key[1]:
            self.views[key] = src
            return src
        if sv.dim() + 1 == len(shape) and shape[1] == 1:
            out = self.after(aten.unsqueeze.default, (src, 1))
        elif sv.dim() == len(shape) + 1 and sv.shape[1] == 1:
            out = self.after(aten.squeeze.dim, (src, 1))
        else:
            # token dim first, static trailing dims (a SymInt cannot be an FX constant)
            out = self.after(aten.reshape.default, (src, [-1] + [int(d) for d in shape[1:]]))
        self.views[key] = out
        return out


def _rewire_k(plan: FusionPlan, views: _Views) -> None:
    """Readers of the rotated k_pe read a view of ``k_in``; regenerated bases are the bases."""
    attn = plan.attn
    for n in plan.k_value_nodes:
        for u in list(n.users):
            if u is attn.node or u is plan.update.node or (u.op == "call_function" and is_slice_scatter(u)
                                                           and any(u is r for r, _ in plan.root_value_nodes)):
                continue
            u.replace_input_with(n, views.like(plan.k_in, n))
    for ss, base in plan.root_value_nodes:
        ss.replace_all_uses_with(base)


def _rewire_q(plan: FusionPlan, views: _Views) -> None:
    """Readers of the rotated q_pe read ``q_orig[..., P:P+R]``; readers of the rotated q, ``q_orig``."""
    q_pe_view = None
    for n in plan.q_pe_value_nodes:
        for u in list(n.users):
            if u in plan.dead or u in plan.q_value_nodes or u in plan.cone:
                continue
            if q_pe_view is None:
                q_pe_view = views.after(aten.slice.Tensor, (plan.q_orig, -1, plan.P, plan.P + plan.R))
            u.replace_input_with(n, q_pe_view)
    for n in plan.q_value_nodes:
        for u in list(n.users):
            if u is not plan.attn.node:
                u.replace_input_with(n, plan.q_orig)


def _erase(graph: Graph, plan: FusionPlan) -> None:
    """Erase the plan's dead nodes (and their unused getitems); any left over is a bug."""
    for n in plan.dead:
        if n.graph is graph and n.target is operator.getitem:
            for u in list(n.users):
                if not u.users and u.target is operator.getitem:
                    graph.erase_node(u)
    erased = fx.erase_dead(graph, list(plan.dead) + [n for n, _ in plan.root_value_nodes] + list(plan.cone))
    leftover = [n for n in plan.dead if n not in erased]
    if leftover:
        raise AssertionError(f"mla fusion left {leftover} in the graph")
