"""Inductor patterns of the QK-RoPE / KV-cache / q-prep fusion.

``MLAQkRopeKVCacheFusionPass`` (:mod:`mla_passes.passes.fusion`) plans its
rewrite from the hits of these registered patterns (see :mod:`._engine`);
they are matched first, and only a RoPE that none of them covers goes to
the semantic check of :mod:`.rope`. Registered (``mla-passes patterns``
prints every variant):

* anchors: ``mla_attention`` (the MLA attention op, direct or
  ``auto_functionalized`` v1/v2), ``mla_kv_cache_update`` (raw form) and
  ``fused_rope_kv_cache_update`` (vLLM's fused-rope op, DESIGN §3), each
  binding ``layer_name``;
* the rotated q_pe written into q: ``q_pe_scatter`` (raw form,
  ``slice_scatter(q, copy(q[..., P:], q_pe_rot))``) and
  ``fused_rope_q_scatter`` (``slice_scatter(q, getitem(fused_rope, 1))``,
  with or without the ``copy``);
* RoPE of one tensor as vLLM 0.32 traces it: ``rope_gptj_native`` and
  ``rope_neox_native`` (``ApplyRotaryEmb.forward_static`` under
  ``RotaryEmbedding.forward_native``: step-2 slices + stack, or chunk + cat),
  ``rope_gptj_deepseek`` and ``rope_neox_deepseek``
  (``DeepseekScalingRotaryEmbedding.forward_native``: full-width cos/sin
  times ``x`` plus ``rotate_gptj``/``rotate_neox(x)`` times sin), each also with
  a final dtype cast (``enable_fp32_compute`` / ``.to(orig_dtype)``).

Guards sit in each pattern's ``extra_check``: slices and concatenations on
the last dim, split in halves, output shaped like the input, and cos/sin
traced back (through ``unsqueeze(-2)``, and for the DeepSeek form the
repeat or repeat-interleave to full width) to the two halves of ONE
``cos_sin_cache[positions]`` gather. Casts are looked through only where
the fused op may drop them (:mod:`.casts`: a widening, or a rounding no
coarser than the stored dtype); a narrowing cast on the input, cos/sin or
the result fails the guard and leaves the layer to the semantic check,
which refuses it by name.

Procedural on purpose, because a pattern cannot say it: that the q a
scatter writes into is the memory the fused op will rotate in place (a
question of aliasing: :class:`mla_passes.passes.fx.Region`), who else
reads that memory after the fusion point, the walk from the attention's q
back through reshapes to the scatter, and the in-place emission.
"""

from __future__ import annotations

import functools
import logging
import operator

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized
from torch._inductor.pattern_matcher import MULTIPLE, CallFunction, Ignored, KeywordArg
from torch.fx import Node

from mla_passes import fx
from mla_passes.op_handles import op_handles

from . import casts
from ._engine import Hits, PatternSet, register_op_anchor
from ._engine import anchor_calls as _anchor_calls
from .rope import RopeMatch

logger = logging.getLogger(__name__)
aten = torch.ops.aten
prims = torch.ops.prims
VIEWS = [aten.view.default, aten.reshape.default, aten._unsafe_view.default]
CASTS = casts.CASTS
GATHERS = (aten.index.Tensor, aten.index_select.default, aten.embedding.default)

# name -> (is_neox, cos/sin full width)
ROPE_FORMS = {
    "rope_gptj_native": (False, False),
    "rope_neox_native": (True, False),
    "rope_gptj_deepseek": (False, True),
    "rope_neox_deepseek": (True, True),
}


# --- guards ---------------------------------------------------------------------------

def _last(d, nd) -> bool:
    return isinstance(d, int) and d in (-1, nd - 1)


def _shape(n):
    """``n``'s shape, sizes as ints or sympy expressions: comparing them is
    structural and never guards a SymInt."""
    v = fx.val(n)
    return tuple(fx._expr(d) for d in v.shape) if isinstance(v, torch.Tensor) else None


def strip_casts(n, stored):
    """``n`` without the casts on top that the fusion may drop for results
    stored in ``stored`` dtypes (:func:`mla_passes.patterns.casts.cast_ok`);
    a narrowing cast stays, and the structural check above it fails."""
    return casts.strip(n, stored)


def _gather_of(n: Node, R: int, stored):
    """(positions, table) when ``n`` is ``table[positions]`` (index / index_select
    on dim 0 / embedding) of a ``[max_pos, R]`` graph input, else None."""
    if not isinstance(n, Node) or n.op != "call_function" or n.target not in GATHERS:
        return None
    if n.target is aten.index.Tensor:
        idx = n.args[1]
        if not (isinstance(idx, (list, tuple)) and len(idx) == 1):
            return None
        table, pos = n.args[0], idx[0]
    elif n.target is aten.index_select.default:
        if n.args[1] not in (0, -2):
            return None
        table, pos = n.args[0], n.args[2]
    else:
        table, pos = n.args[0], n.args[1]
    tv, pv = fx.val(table), fx.val(pos)
    root = strip_casts(table, stored)
    if not (isinstance(tv, torch.Tensor) and isinstance(pv, torch.Tensor) and tv.dim() == 2 and tv.shape[-1] == R
            and tv.is_floating_point() and not pv.is_floating_point() and pv.dim() == 1
            and isinstance(root, Node) and root.op in ("placeholder", "get_attr")):
        return None
    return pos, root


def _half_of(n, R: int):
    """(split node, index) when ``n`` is half ``index`` of ``split(gather, R/2, -1)``."""
    if not (isinstance(n, Node) and n.target is operator.getitem and n.args[1] in (0, 1)):
        return None
    sp = n.args[0]
    if not (isinstance(sp, Node) and sp.target is aten.split.Tensor and len(sp.args) >= 2
            and sp.args[1] == R // 2 and _last(sp.args[2] if len(sp.args) > 2 else 0, 2)):
        return None
    return sp, n.args[1]


def _widened(n, R: int, is_neox: bool):
    """The half-width ``[T, R/2]`` node that full-width ``n`` ``[T, R]`` repeats
    (NeoX: ``cat((h, h))``) or repeat-interleaves (GPT-J), else None."""
    if not isinstance(n, Node) or n.op != "call_function":
        return None
    if is_neox and n.target is aten.cat.default:
        parts, d = n.args[0], (n.args[1] if len(n.args) > 1 else 0)
        if len(parts) == 2 and parts[0] is parts[1] and _last(d, 2):
            return parts[0]
        return None
    if n.target is aten.repeat_interleave.self_int and not is_neox:
        if n.args[1] == 2 and _last(n.args[2] if len(n.args) > 2 else None, 2):
            return n.args[0]
        return None
    # decomposed: view(clone(expand(unsqueeze(h, k), s)), [T, R]); k = 2 interleaves, k = 1 repeats
    if n.target not in VIEWS or _shape(n) is None or len(_shape(n)) != 2:
        return None
    c = n.args[0]
    if isinstance(c, Node) and c.target is aten.clone.default:
        c = c.args[0]
    if not (isinstance(c, Node) and c.target is aten.expand.default):
        return None
    u = c.args[0]
    if not (isinstance(u, Node) and u.target is aten.unsqueeze.default):
        return None
    es = _shape(c)
    want = (2, -1) if not is_neox else (1, -2)  # unsqueeze dim, where the 2 copies sit in the expand
    if u.args[1] not in (want[0], want[0] - 3) or es is None or len(es) != 3 or es[want[1]] != 2:
        return None
    return u.args[0]


def _cos_sin_half(n, nd: int, R: int, full: bool, is_neox: bool, stored):
    """cos or sin as the rotation reads it -> the ``[T, R/2]`` half node, checking
    the ``unsqueeze(-2)`` that broadcasts it over heads."""
    n = strip_casts(n, stored)
    if not (isinstance(n, Node) and n.target is aten.unsqueeze.default):
        return None
    s = _shape(n)
    width = R if full else R // 2
    if s is None or len(s) != nd or s[-2] != 1 or s[-1] != width or n.args[1] not in (-2, nd - 2):
        return None
    h = strip_casts(n.args[0], stored)
    return _widened(h, R, is_neox) if full else h


def rope_source(hit) -> tuple | None:
    """(positions, cos_sin_cache) behind a RoPE hit's cos and sin: the first and
    second half of one ``cos_sin_cache[positions]``; None if they are not."""
    is_neox, full = ROPE_FORMS[hit.name]
    x = hit["x"]
    s = _shape(x)
    if s is None or len(s) < 2:
        return None
    R, nd = s[-1], len(s)
    stored = stored_dtypes(x)
    ch = _cos_sin_half(hit["cos"], nd, R, full, is_neox, stored)
    sh = _cos_sin_half(hit["sin"], nd, R, full, is_neox, stored)
    c, si = _half_of(strip_casts(ch, stored), R), _half_of(strip_casts(sh, stored), R)
    if c is None or si is None or c[0] is not si[0] or (c[1], si[1]) != (0, 1):
        return None
    return _gather_of(c[0].args[0], R, stored)


def stored_dtypes(x) -> set:
    """The dtype a RoPE hit's result is stored in: that of the tensor ``x``
    reads (below its casts), which the fused op rotates in place."""
    d = casts.root_dtype(x)
    return {d} if d is not None else set()


def _casts_problem(m, name) -> str | None:
    """A cast in the hit the fusion would drop but may not (the input reads,
    the final cast), else None. cos/sin casts are judged in :func:`rope_source`."""
    k = m.kwargs
    stored = stored_dtypes(k["x"])
    for read in ("x",) + X_READS:
        if read in k:
            n = strip_casts(k[read], stored)
            if casts.is_cast(n):
                return f"{name}: the RoPE input is rounded by the cast {casts.describe(n)}"
    out = m.output_node()
    if casts.is_cast(out) and not casts.cast_ok(out, stored):
        return f"{name}: the RoPE result is rounded by the cast {casts.describe(out)}"
    return None


def _rope_check(name):
    is_neox, full = ROPE_FORMS[name]

    def check(m) -> bool:
        x = m.kwargs["x"]
        s = _shape(x)
        if s is None or len(s) < 2 or not isinstance(s[-1], int) or s[-1] % 2 or not _same_x(m.kwargs):
            return False
        R, nd = s[-1], len(s)
        k = m.kwargs
        if not is_neox:
            if not (_last(k["x1_dim"], nd) and _last(k["x2_dim"], nd)
                    and isinstance(k["x1_end"], int) and isinstance(k["x2_end"], int)
                    and k["x1_end"] >= R and k["x2_end"] >= R):
                return False
            if not (k["s1"] in (-1, nd) and k["s2"] in (-1, nd) and k["cat_dim"] in (-1, nd)):
                return False
        elif not full:
            if not (k["half"] == R // 2 and _last(k["split_dim"], nd) and _last(k["cat_dim"], nd)):
                return False
        else:
            if not (_last(k["x1_dim"], nd) and _last(k["x2_dim"], nd) and k["half1"] == R // 2
                    and k["half2"] == R // 2 and isinstance(k["x2_end"], int) and k["x2_end"] >= R
                    and _last(k["cat_dim"], nd)):
                return False
        if _shape(m.output_node()) != s:
            return False
        problem = _casts_problem(m, name)
        if problem is not None:  # left to the semantic check, which refuses it and says why
            logger.debug("RoPE pattern %s", problem)
            return False
        src = rope_source(_HitView(name, m.kwargs))
        m.kwargs["cos_sin_source"] = src  # recorded with the hit: (positions, cos_sin_cache)
        return src is not None

    return check


class _HitView:
    """A match's kwargs under a pattern name (what :func:`rope_source` reads)."""

    def __init__(self, name, kwargs):
        self.name, self.kwargs = name, kwargs

    def __getitem__(self, key):
        return self.kwargs[key]


# --- patterns -------------------------------------------------------------------------

def _mul(a, b):
    return CallFunction(aten.mul.Tensor, a, b)


# Each read of x in a RoPE pattern binds its own name: vLLM's traced graph
# (before Inductor's CSE) reads x through separate but identical view chains
# (``q.view(-1, H, P + R)[..., P:]`` once per use), which one repeated
# KeywordArg would turn away. The guard then requires every x_* to cover the
# same memory as x (:func:`_same_x`).
X_READS = ("x_b", "x_c")


def _same_x(k) -> bool:
    """Every extra read of x covers the memory x covers (same root, sizes, strides, offset)."""
    x = k["x"]
    others = [k[n] for n in X_READS if n in k and k[n] is not x]
    if not others:  # every read is the same node (a CSE'd graph): nothing to compare
        return isinstance(fx.val(x), torch.Tensor)
    rx = fx.Region.of(x)
    return rx is not None and all(fx.Region.of(o) == rx for o in others)


def _rope_patterns(name):
    """Variants of RoPE form ``name`` (the rotation, then an optional cast)."""
    is_neox, full = ROPE_FORMS[name]
    x, x_b, x_c = KeywordArg("x"), KeywordArg("x_b"), KeywordArg("x_c")
    cos, sin = KeywordArg("cos"), KeywordArg("sin")
    if not full:
        if is_neox:
            sp = CallFunction(aten.split.Tensor, x, KeywordArg("half"), KeywordArg("split_dim"), _users=2)
            x1 = CallFunction(operator.getitem, sp, 0, _users=2)
            x2 = CallFunction(operator.getitem, sp, 1, _users=2)
        else:
            x1 = CallFunction(aten.slice.Tensor, x, KeywordArg("x1_dim"), 0, KeywordArg("x1_end"), 2, _users=2)
            x2 = CallFunction(aten.slice.Tensor, x_b, KeywordArg("x2_dim"), 1, KeywordArg("x2_end"), 2, _users=2)
        o1 = CallFunction(aten.sub.Tensor, _mul(x1, cos), _mul(x2, sin))
        o2 = CallFunction(aten.add.Tensor, _mul(x2, cos), _mul(x1, sin))
        if is_neox:
            rot = CallFunction(aten.cat.default, [o1, o2], KeywordArg("cat_dim"))
        else:
            st = CallFunction(aten.cat.default, [CallFunction(aten.unsqueeze.default, o1, KeywordArg("s1")),
                                                 CallFunction(aten.unsqueeze.default, o2, KeywordArg("s2"))],
                              KeywordArg("cat_dim"))
            rot = CallFunction(VIEWS, st, Ignored())
    else:
        if is_neox:
            x1 = CallFunction(aten.slice.Tensor, x, KeywordArg("x1_dim"), 0, KeywordArg("half1"))
            x2 = CallFunction(aten.slice.Tensor, x_b, KeywordArg("x2_dim"), KeywordArg("half2"), KeywordArg("x2_end"))
            rotated = CallFunction(aten.cat.default, [CallFunction(aten.neg.default, x2), x1], KeywordArg("cat_dim"))
        else:
            x1 = CallFunction(aten.slice.Tensor, x, KeywordArg("x1_dim"), 0, KeywordArg("x1_end"), 2)
            x2 = CallFunction(aten.slice.Tensor, x_b, KeywordArg("x2_dim"), 1, KeywordArg("x2_end"), 2)
            st = CallFunction(aten.cat.default, [
                CallFunction(aten.unsqueeze.default, CallFunction(aten.neg.default, x2), KeywordArg("s1")),
                CallFunction(aten.unsqueeze.default, x1, KeywordArg("s2"))], KeywordArg("cat_dim"))
            rotated = CallFunction(VIEWS, st, Ignored())
        rot = CallFunction(aten.add.Tensor, _mul(x_c, cos), _mul(rotated, sin))
    return [rot, CallFunction(prims.convert_element_type.default, rot, KeywordArg("out_dtype"))]


ROPE_DOCS = {
    "rope_gptj_native": "GPT-J RoPE, vLLM RotaryEmbedding.forward_native: x[...,::2], x[...,1::2]; "
                        "x1*cos - x2*sin, x2*cos + x1*sin; stack(-1).flatten(-2)",
    "rope_neox_native": "NeoX RoPE, vLLM RotaryEmbedding.forward_native: chunk(x, 2); "
                        "cat(x1*cos - x2*sin, x2*cos + x1*sin)",
    "rope_gptj_deepseek": "GPT-J RoPE, vLLM DeepseekScalingRotaryEmbedding.forward_native: "
                          "x*cos + rotate_gptj(x)*sin, cos/sin repeat_interleave'd to full width",
    "rope_neox_deepseek": "NeoX RoPE, vLLM DeepseekScalingRotaryEmbedding.forward_native: "
                          "x*cos + rotate_neox(x)*sin, cos/sin cat'd to full width",
}


def _scatter_check():
    def check(m) -> bool:
        k = m.kwargs
        base = k["q_base"]
        bv = fx.val(base)
        if not isinstance(bv, torch.Tensor) or not _last(k["dim"], bv.dim()) or not isinstance(k["start"], int):
            return False
        if "q_pe_dest" in k:
            end = k["end"] if isinstance(k["end"], int) else 2**63 - 1
            want = fx.Region.of(base).slice_last(k["start"], end)
            if fx.Region.of(k["q_pe_dest"]) != want:
                return False
        return True

    return check


@functools.lru_cache(maxsize=None)
def pattern_set(attention: frozenset, kv_cache_update: frozenset, fused_rope: frozenset) -> PatternSet:
    """The fusion's patterns for these op overloads, registered once per process."""
    ps = PatternSet("mla_qk_rope_kvcache_fusion", __name__)
    register_op_anchor(ps, "mla_attention", "the MLA attention (direct, auto_functionalized v1 or v2)", attention)
    register_op_anchor(ps, "mla_kv_cache_update", "the raw form's latent-cache update", kv_cache_update)
    register_op_anchor(ps, "fused_rope_kv_cache_update", "vLLM's fused RoPE + latent-cache update (DESIGN §3)",
                       fused_rope, direct=False)
    for op in sorted(fused_rope, key=str):
        fr1 = CallFunction(auto_functionalized, op, layer_name=KeywordArg("layer_name"), _users=MULTIPLE)
        rotated = CallFunction(operator.getitem, fr1, 1)
        doc = "fused-rope form: the op's rotated q_pe scattered into q (auto_functionalized v1)"
        for src in (rotated, CallFunction(aten.copy.default, KeywordArg("q_pe_dest"), rotated)):
            ps.register("fused_rope_q_scatter", doc,
                        CallFunction(aten.slice_scatter.default, KeywordArg("q_base"), src, KeywordArg("dim"),
                                     KeywordArg("start"), KeywordArg("end")), _scatter_check())
    ps.register("q_pe_scatter", "raw form: slice_scatter(q, copy(q[..., P:], q_pe_rot), -1, P)",
                CallFunction(aten.slice_scatter.default, KeywordArg("q_base"),
                             CallFunction(aten.copy.default, KeywordArg("q_pe_dest"), KeywordArg("q_pe_rot")),
                             KeywordArg("dim"), KeywordArg("start"), KeywordArg("end")),
                _scatter_check())
    for name in ROPE_FORMS:
        for p in _rope_patterns(name):
            ps.register(name, ROPE_DOCS[name], p, _rope_check(name))
    return ps


def patterns_for(handles) -> PatternSet:
    return pattern_set(handles.attention, handles.kv_cache_update, handles.fused_rope)


ANCHORS = ("mla_attention", "mla_kv_cache_update", "fused_rope_kv_cache_update", "fused_rope_q_scatter",
           "q_pe_scatter")


def match(graph, handles) -> Hits:
    """The anchors' and scatters' hits in ``graph``; RoPE patterns are tried
    later, at the nodes the plan names (:func:`rope_for_layer`)."""
    ps = patterns_for(handles)
    hits = ps.match(graph, ANCHORS)
    hits.pattern_set = ps
    return hits


# --- consuming hits -------------------------------------------------------------------

def _rope_hit(hits: Hits, n):
    """The RoPE hit that produces ``n`` (through same-shape views), or None."""
    for _ in range(3):
        if not isinstance(n, Node):
            return None
        hits.pattern_set.match_at(n, hits, ROPE_FORMS)
        for h in hits.by_root.get(n, ()):
            if h.name in ROPE_FORMS:
                return h
        if n.op == "call_function" and n.target in VIEWS and _shape(n) is not None \
                and _shape(n) == _shape(n.args[0]):
            n = n.args[0]
        else:
            return None
    return None


def rope_for_layer(hits: Hits, q_rot: Node, k_rot: Node, q_pe_region, R: int):
    """A :class:`mla_passes.patterns.rope.RopeMatch` (``pattern_names`` set,
    ``cone``: the matched nodes, private by the patterns' user counts)
    when registered RoPE patterns produce ``q_rot`` from ``q_pe_region`` and
    ``k_rot`` from a ``[T, R]``/``[T, 1, R]`` k, with one convention, one
    ``positions`` and one ``cos_sin_cache``; else None (semantic fallback)."""
    hq, hk = _rope_hit(hits, q_rot), _rope_hit(hits, k_rot)
    if hq is None or hk is None or ROPE_FORMS[hq.name][0] != ROPE_FORMS[hk.name][0]:
        return None
    src = hq["cos_sin_source"]
    if src is None or src != hk["cos_sin_source"]:
        return None
    xq, xk = strip_casts(hq["x"], stored_dtypes(hq["x"])), strip_casts(hk["x"], stored_dtypes(hk["x"]))
    if fx.Region.of(xq) != q_pe_region:
        return None
    kv = fx.val(xk)
    if not isinstance(kv, torch.Tensor) or kv.shape[-1] != R or kv.dim() not in (2, 3) \
            or (kv.dim() == 3 and kv.shape[1] != 1):
        return None
    # the earliest [T, R] / [T, 1, R] view of k's memory, as the semantic path picks it
    while fx.is_view(xk):
        up = fx.view_source(xk)
        uv = fx.val(up)
        if not (fx.is_view(up) and isinstance(uv, torch.Tensor) and uv.dim() in (2, 3) and uv.shape[-1] == R
                and _shape(up)[0] == _shape(xk)[0] and (uv.dim() == 2 or uv.shape[1] == 1)):
            break
        xk = up
    positions, table = src
    m = RopeMatch(positions=positions, cos_sin_cache=table, q_root=fx.root_of(xq), k_in=xk,
                  is_neox=ROPE_FORMS[hq.name][0], cone=set(hq.nodes) | set(hk.nodes))
    m.pattern_names = (hq.name, hk.name)
    return m


def anchor_calls(hits: Hits, handles) -> list:
    """The attention / cache-update / fused-rope calls the anchors matched, as
    :class:`mla_passes.passes.fx.OpCall` views, in graph order."""
    return _anchor_calls(hits, ("mla_attention", "mla_kv_cache_update", "fused_rope_kv_cache_update"),
                         handles.attention | handles.kv_cache_update | handles.fused_rope)


def anchor_name(call) -> str:
    """The anchor pattern name of an OpCall (for the per-pattern counts)."""
    h = op_handles()
    if call.op in h.attention:
        return "mla_attention"
    return "fused_rope_kv_cache_update" if call.op in h.fused_rope else "mla_kv_cache_update"
