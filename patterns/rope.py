"""RoPE in a post-grad graph: find the subgraph, prove it is RoPE, read its style.

The raw form (DESIGN §3) computes RoPE with aten ops, and the exact op
sequence varies with the rotary-embedding class (vLLM's native
``RotaryEmbedding`` uses ``index`` + ``split`` + step-2 slices; the DeepSeek
scaling variant uses full-width cos/sin with ``repeat_interleave``/``cat`` and a
``rotate`` helper), with the pairing (NeoX or GPT-J), with dtype casts of the
cos/sin cache, with how functionalization regenerated the views (one
``reshape`` of the projection per slice in vLLM's CPU graph), and with CSE.
The forms vLLM traces are registered Inductor patterns
(:mod:`.qk_rope_kvcache`) and are matched first; a pattern is one op
sequence, and the next variant (operands commuted, another helper, another
cast) would be missed. For those this module is the fallback. It decides by
structure first and checks the numbers second:

1. :func:`private_cone` collects the nodes that only feed the rotated q_pe /
   k_pe (the subgraph the fusion may delete);
2. :func:`extract` walks from the cone to its leaves: the q and k
   projection outputs (through view ops), ``positions`` and
   ``cos_sin_cache``. Every cos/sin gather (``index`` / ``index_select`` /
   ``embedding``) the subgraph reads must read ONE table at ONE positions
   value, the same graph node for q and for k (below value-preserving
   integer casts), and nothing else in the subgraph may read either;
3. :func:`foreign_op` refuses a subgraph holding any operation that is not
   one a rotation is built from (:data:`ROTATION_OPS`: the gather,
   multiply, add / subtract, negate, concatenation and interleave, views,
   casts). Such an op (``clamp``, ``nan_to_num``, ``where``, ``maximum``,
   ``abs``, ...) can be the identity on every value a numeric trial draws
   and still change the result on others (activations past a clip, an
   inf), so no number of trials could rule it out;
4. :func:`verify` evaluates what is left on independent inputs
   (:data:`TRIALS`: concrete shapes, symbolic token counts substituted) and
   compares it with RoPE computed in float64, NeoX and GPT-J style. With
   the ops of :data:`ROTATION_OPS` the subgraph is a polynomial in q, k and
   the gathered table rows (up to rounding), so agreeing with RoPE on
   independent random inputs is evidence about every input, not only the
   drawn ones. It must agree on every trial and every element: bit for bit
   on inputs whose RoPE is exact in bf16/fp16/fp32 (but not in fp8), and
   within :data:`ROUNDINGS` unit roundoffs of the dtype the result is
   stored in (q's, k's; never an intermediate's), times the magnitude of
   the element's two terms ``|a*cos| + |b*sin|``, on random inputs and
   tables. Before that, :func:`narrowing_cast` refuses a subgraph with a
   cast the fused op would drop but may not (:mod:`.casts`).
   The verdict is cached by a structural signature of the subgraph, so a
   61-layer model pays for one evaluation.

A subgraph that computes anything else (a sign flip, swapped sin/cos, RoPE
times 1.02, RoPE + 0.05, a clip of the result, q at other positions than k)
is left alone, and the refusal names what was found.
"""

from __future__ import annotations

import functools
import logging
import operator
from dataclasses import dataclass, field

import sympy
import torch
from torch.fx import Node

from mla_passes import fx

from . import casts

logger = logging.getLogger(__name__)

GATHER_OPS = frozenset({torch.ops.aten.index.Tensor, torch.ops.aten.index_select.default,
                        torch.ops.aten.embedding.default})
_PURE_NAMESPACES = ("aten", "prims")
MAX_POS_ONLY_DEPTH = 12
_aten = torch.ops.aten

# The operations a rotation is built from: the only ones the semantic check
# accepts between the q/k projections and the cache write / attention
# (DESIGN §3, "The semantic check"). Besides these, any view (an op whose
# schema says its result aliases its input: view, slice, select, split /
# chunk, unsqueeze, squeeze, expand, permute, transpose, ...) and the pieces
# of a multi-output view. Casts are judged further by :func:`narrowing_cast`.
# Every other op is refused by name (:func:`foreign_op`).
ROTATION_OPS = {
    "gather": GATHER_OPS,
    "multiply": frozenset({_aten.mul.Tensor, _aten.mul.Scalar}),
    "add / subtract": frozenset({_aten.add.Tensor, _aten.add.Scalar, _aten.sub.Tensor, _aten.sub.Scalar}),
    "negate": frozenset({_aten.neg.default}),
    "concatenate / interleave": frozenset({_aten.cat.default, _aten.stack.default, _aten.repeat.default,
                                           _aten.repeat_interleave.self_int, _aten.clone.default,
                                           _aten._unsafe_view.default}),
    "cast": frozenset(casts.CASTS),
}
_ROTATION_TARGETS = frozenset().union(*ROTATION_OPS.values())


_pure_targets: dict = {}


def _pure(n: Node) -> bool:
    if n.op != "call_function":
        return False
    t = n.target
    if t is operator.getitem:
        return isinstance(n.args[0], Node) and _pure(n.args[0])
    p = _pure_targets.get(t)
    if p is None:
        p = _pure_targets[t] = (isinstance(t, torch._ops.OpOverload) and t.namespace in _PURE_NAMESPACES
                                and not t._schema.is_mutable)
    return p


def private_cone(outputs: list[Node], allowed_users: set[Node]) -> set[Node] | None:
    """Pure nodes that feed only ``outputs`` (the outputs included).

    ``outputs`` may have users outside (``allowed_users`` or anything: the
    caller rewires those). A multi-output node joins only with all its getitems.
    """
    cone = set(outputs)
    work = list(outputs)
    while work:
        n = work.pop()
        for m in n.all_input_nodes:
            if m in cone or not _pure(m):
                continue
            for u in m.users:
                if u not in cone:
                    break
            else:
                cone.add(m)
                work.append(m)
    # a getitem whose multi-output source stayed outside is a boundary value
    for n in list(cone):
        if n.target is operator.getitem and n.args[0] not in cone and n not in outputs:
            cone.discard(n)
    # drop nodes that became disconnected from the outputs
    live, work = set(), list(outputs)
    while work:
        n = work.pop()
        if n in live:
            continue
        live.add(n)
        work.extend(m for m in n.all_input_nodes if m in cone)
    return live


@dataclass
class RopeMatch:
    """What :func:`extract` + :func:`verify` found."""

    positions: Node
    cos_sin_cache: Node
    q_root: Node
    k_in: Node | None = None          # the [T,R] / [T,1,R] view the fused op rotates in place
    is_neox: bool | None = None
    cone: set = field(default_factory=set)
    eval_nodes: list = field(default_factory=list)
    leaves: list = field(default_factory=list)


def _is_gather(n: Node, R: int):
    if n.op != "call_function" or n.target not in GATHER_OPS:
        return None
    table, idx = _gather_args(n)
    tv, iv = fx.val(table), fx.val(idx)
    if (isinstance(tv, torch.Tensor) and isinstance(iv, torch.Tensor) and tv.dim() == 2
            and tv.shape[-1] == R and tv.is_floating_point() and not iv.is_floating_point() and iv.dim() == 1):
        return n, table, idx
    return None


def rotation_op(n: Node) -> bool:
    """Whether ``n`` is one of the operations a rotation is built from
    (:data:`ROTATION_OPS`, any view, a piece of a multi-output view)."""
    return (n.op == "call_function"
            and (n.target is operator.getitem or n.target in _ROTATION_TARGETS or fx.is_view(n)))


def _find_gathers(cone, R, max_depth: int = 4) -> list:
    """Every cos/sin gather the cone reads: in the cone, and at most
    ``max_depth`` steps above it (a gather CSE'd across layers) through
    rotation ops only (never up through a projection to, say, a token
    embedding). In graph order, so no choice depends on set iteration."""
    found = {}
    for n in cone:
        g = _is_gather(n, R)
        if g:
            found[n] = g
    frontier = {m for n in cone for m in n.all_input_nodes if m not in cone}
    seen = set(frontier) | set(cone)
    for _ in range(max_depth):
        nxt = set()
        for n in frontier:
            g = _is_gather(n, R)
            if g:
                found[n] = g
            elif _pure(n) and rotation_op(n):
                nxt.update(m for m in n.all_input_nodes if m not in seen)
        seen |= nxt
        frontier = nxt
    return [found[n] for n in sorted(found)]


def _index_root(n):
    """The positions value an index reads: ``n`` below integer casts that keep
    every value (int32 -> int64); a narrowing cast is a value of its own."""
    while casts.is_cast(n):
        src, dst = casts.cast_dtypes(n)
        if src is None or dst is None or src.is_floating_point or dst.is_floating_point \
                or src == torch.bool or dst == torch.bool:
            break
        si, di = torch.iinfo(src), torch.iinfo(dst)
        if di.min > si.min or di.max < si.max:
            break
        n = n.args[0]
    return n


def _gather_args(n: Node):
    if n.target is torch.ops.aten.index.Tensor:
        idx = n.args[1]
        return n.args[0], (idx[0] if isinstance(idx, (list, tuple)) and len(idx) == 1 else None)
    if n.target is torch.ops.aten.index_select.default:
        return (n.args[0], n.args[2]) if n.args[1] in (0, -2) else (n.args[0], None)
    return n.args[0], n.args[1]  # embedding(weight, indices)


def _strip_casts(n: Node) -> Node:
    """The table below its casts. The casts are not dropped: they stay in the
    evaluated subgraph and :func:`narrowing_cast` judges them."""
    while casts.is_cast(n):
        n = n.args[0]
    return n


def extract(cone: set[Node], q_root: Node, R: int, order: dict | None = None) -> "RopeMatch | str":
    """Leaves of the RoPE subgraph ``cone``; a reason (str) if they are not
    ``(q_root, one k root, positions, cos_sin_cache)`` with every cos/sin
    read at that one ``positions`` node of that one table."""
    gathers = _find_gathers(cone, R)
    if not gathers:
        return "no cos/sin gather (index / index_select / embedding of a [max_pos, R] table) feeds it"
    tables = list(dict.fromkeys(_strip_casts(t) for _, t, _ in gathers))
    if len(tables) != 1:
        return "cos/sin read from several tables (%s)" % ", ".join(t.name for t in tables)
    cos_sin = tables[0]
    if cos_sin.op not in ("placeholder", "get_attr"):
        return f"the cos/sin table {cos_sin.name} is computed in the graph, not a graph input"
    if any(idx is None for _, _, idx in gathers):
        return "a cos/sin gather does not read rows along dim 0"
    indices = list(dict.fromkeys(_index_root(idx) for _, _, idx in gathers))
    if len(indices) != 1:
        # q and k (or cos and sin) at different positions: equal on most drawn
        # positions, so the numbers could not tell; the graph must prove them one value
        return "cos/sin read at different positions values (%s)" % ", ".join(i.name for i in indices)
    positions = indices[0]
    special = {positions, cos_sin}

    @functools.lru_cache(maxsize=None)
    def pos_only(n: Node, depth: int = 0) -> bool:
        if n in special:
            return True
        if depth > MAX_POS_ONLY_DEPTH or not _pure(n):
            return False
        return all(pos_only(m, depth + 1) for m in n.all_input_nodes)

    eval_set = set(cone)
    leaves: list[Node] = []
    work = [m for n in cone for m in n.all_input_nodes if m not in cone]
    while work:
        b = work.pop()
        if b in eval_set or b in leaves:
            continue
        v = b.meta.get("val")
        if b in special or b is q_root or b.op in ("placeholder", "get_attr"):
            leaves.append(b)
        elif v is not None and not isinstance(v, torch.Tensor) and b.op != "call_function":
            leaves.append(b)
        elif isinstance(v, (torch.SymInt, int)):
            continue  # a size value, substituted at evaluation
        elif fx.is_view(b) or pos_only(b):
            eval_set.add(b)
            work.extend(b.all_input_nodes)
        else:
            leaves.append(b)
    tensor_leaves = [x for x in leaves if isinstance(fx.val(x), torch.Tensor)]
    others = [x for x in tensor_leaves if x not in special and x is not q_root]
    if positions not in leaves and positions not in eval_set:
        return "positions is not an input of the subgraph"
    if len(others) > 1:
        return "more inputs than q, one k, positions and the cos/sin table (%s)" % ", ".join(
            x.name for x in sorted(others))
    order = order if order is not None else {n: i for i, n in enumerate(q_root.graph.nodes)}
    eval_nodes = sorted(eval_set, key=order.__getitem__)
    why = _table_reads(eval_nodes, positions, cos_sin)
    if why:
        return why
    return RopeMatch(positions=positions, cos_sin_cache=cos_sin, q_root=q_root, cone=cone,
                     eval_nodes=eval_nodes, leaves=sorted(tensor_leaves, key=order.__getitem__))


def _table_reads(eval_nodes, positions: Node, cos_sin: Node) -> str | None:
    """Why the subgraph reads ``positions`` or the table other than as a
    gather's index / table (through casts), or None. A position used in the
    math itself, or a table row read without the gather, is not RoPE at
    ``positions``."""
    for n in eval_nodes:
        if n.target in GATHER_OPS:
            table, idx = _gather_args(n)
            if _strip_casts(table) is not cos_sin or _index_root(idx) is not positions:
                return f"{n.name} ({_op_name(n)}) gathers other rows than cos_sin_cache[positions]"
        for a in n.all_input_nodes:
            if _index_root(a) is positions:
                if n.target in GATHER_OPS and _gather_args(n)[1] is a:
                    continue
                if casts.is_cast(n) and _index_root(n) is positions:
                    continue
                return f"{n.name} ({_op_name(n)}) reads positions other than as the cos/sin gather's index"
            if _strip_casts(a) is cos_sin:
                if (n.target in GATHER_OPS and _gather_args(n)[0] is a) or casts.is_cast(n):
                    continue
                return f"{n.name} ({_op_name(n)}) reads the cos/sin table other than through the gather"
    return None


def _op_name(n: Node) -> str:
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._schema.name.split('::')[-1]}" + (
            f".{t._overloadname}" if t._overloadname != "default" else "")
    return getattr(t, "__name__", str(t))


def foreign_op(m: RopeMatch) -> Node | None:
    """The first node (graph order) of the subgraph that is not one of the
    operations a rotation is built from (:data:`ROTATION_OPS`), or None."""
    for n in m.eval_nodes:
        if not rotation_op(n):
            return n
    return None


def describe_op(n: Node) -> str:
    return f"{n.name} ({_op_name(n)})"


# --- numeric verification ----------------------------------------------------------

_verdicts: dict = {}


def _token_symbols(*vals):
    syms = set()
    for v in vals:
        if isinstance(v, torch.Tensor):
            for s in list(v.shape) + list(v.stride()) + [v.storage_offset()]:
                if isinstance(s, torch.SymInt):
                    syms |= s.node.expr.free_symbols
    return syms


def _concrete(x, env):
    if isinstance(x, torch.SymInt):
        return int(x.node.expr.subs(env))
    if isinstance(x, sympy.Expr):
        return int(x.subs(env))
    return x


def _s(x) -> object:
    """A hashable, cheap stand-in for a size (ints stay ints)."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        x = x.node.expr
    return int(x) if getattr(x, "is_Integer", False) else str(x)


def _signature(m: RopeMatch, q_pe_region, k_rot: Node, q_rot: Node):
    """Structure of the subgraph with node references replaced by local
    indices (layer-independent, hashable); equal signatures, equal verdicts."""
    idx = {n: i for i, n in enumerate(m.leaves)}
    base = len(idx)
    for j, n in enumerate(m.eval_nodes):
        idx[n] = base + j

    def ref(a):
        i = idx.get(a)
        if i is not None:
            return i
        v = fx.val(a)
        return ("sym", _s(v)) if isinstance(v, torch.SymInt) else ("ext", a.op, type(v).__name__)

    parts = [("leaf", leaf is m.q_root, leaf is m.positions, leaf is m.cos_sin_cache,
              tuple(map(_s, fx.val(leaf).shape)), tuple(map(_s, fx.val(leaf).stride())), fx.val(leaf).dtype)
             for leaf in m.leaves]
    map_arg = torch.fx.node.map_arg
    parts += [(n.target, map_arg(n.args, ref), map_arg(n.kwargs, ref)) for n in m.eval_nodes]
    parts.append(("out", idx.get(q_rot), idx.get(k_rot), tuple(map(_s, q_pe_region.size)),
                  tuple(map(_s, q_pe_region.stride)), _s(q_pe_region.offset)))
    return tuple(parts)  # map_arg returns fx's hashable immutable_list/dict


def verify(m: RopeMatch, q_pe_region: "fx.Region", q_rot: Node, k_rot: Node, R: int) -> bool:
    """Evaluate the subgraph and set ``m.is_neox`` and ``m.k_in``; False if it is not RoPE."""
    try:
        sig = _signature(m, q_pe_region, k_rot, q_rot)
        cached = _verdicts.get(sig)
    except TypeError:
        sig, cached = None, None
    if cached is None:
        cached = _evaluate(m, q_pe_region, q_rot, k_rot, R)
        if sig is not None:
            _verdicts[sig] = cached
    if cached is False:
        return False
    is_neox, k_index = cached
    m.is_neox = is_neox
    m.k_in = m.eval_nodes[k_index]
    return True


def narrowing_cast(m: RopeMatch) -> Node | None:
    """A cast in the subgraph the fused op would drop but may not
    (:func:`mla_passes.patterns.casts.cast_ok`, results stored in the dtypes
    of the q and k inputs), or None. The fused op reads q, k and the table
    as they are and rounds once, to the stored dtype: a narrowing on any
    edge (input, cos/sin, output) is math it does not do."""
    stored = {fx.val(x).dtype for x in m.leaves
              if x is not m.cos_sin_cache and x is not m.positions and fx.val(x).is_floating_point()}
    for n in m.eval_nodes:
        if casts.is_cast(n) and not casts.cast_ok(n, stored):
            return n
    return None


# Independent evaluations a match must pass, every one: (seed, exact). ``exact``
# fills the float leaves with values whose RoPE is exactly representable in
# bf16/fp16/fp32 (eighths in [-31/8, 31/8]: five significant bits, so a
# quarter of them are not values of float8_e4m3fn and most not of e5m2; a
# table of {-1, -0.5, 0, 0.5, 1}), so the subgraph must reproduce the
# reference bit for bit; the random ones hold it to the per-element rounding
# bound of :func:`_within_rounding`, at the rounding of the dtypes the
# results are stored in (q's, k's), never of an intermediate.
TRIALS = ((1234, False), (98765, False), (4321, True))
# Roundings a true RoPE element may carry, each at most one unit roundoff of
# the narrowest float dtype in the subgraph: cos/sin cast to the compute dtype,
# the two products, the add/sub, the cast of the result (products rounded into
# the sum count once each). DESIGN §3: anything looser let RoPE x 1.02 through.
ROUNDINGS = 5


def _evaluate(m: RopeMatch, q_pe_region, q_rot: Node, k_rot: Node, R: int):
    """``(is_neox, index of the k input in eval_nodes)`` when the subgraph is
    RoPE on every trial of :data:`TRIALS`, else False."""
    common = None
    for seed, exact in TRIALS:
        found = _evaluate_once(m, q_pe_region, q_rot, k_rot, R, seed, exact)
        if not found:
            return False
        common = found if common is None else [c for c in common if c in found]
        if not common:
            logger.debug("RoPE check: the trials disagree on style / k input")
            return False
    return common[0]


def _rounding_of(dtypes) -> tuple[float, float]:
    """(unit roundoff, subnormal spacing) of the narrowest float dtype in
    ``dtypes`` (the dtypes results are stored in: :func:`_evaluate_once`)."""
    fl = [torch.finfo(d) for d in dtypes if d.is_floating_point]
    if not fl:
        return 2.0 ** -24, 0.0
    return max(f.eps / 2 for f in fl), max(f.smallest_normal * f.eps for f in fl)


def _rope64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool):
    """RoPE of ``x`` in float64 (exact for the trial values; within 2^-53 of
    exact otherwise), and per element the magnitude ``|a*cos| + |b*sin|`` of
    its two terms, which scales the rounding a low-precision subgraph may add."""
    x = x.double()
    cos, sin = cos.double(), sin.double()
    if is_neox:
        x1, x2 = x.chunk(2, dim=-1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    m1, m2 = (x1 * cos).abs() + (x2 * sin).abs(), (x2 * cos).abs() + (x1 * sin).abs()
    if is_neox:
        return torch.cat((o1, o2), dim=-1), torch.cat((m1, m2), dim=-1)
    return torch.stack((o1, o2), dim=-1).flatten(-2), torch.stack((m1, m2), dim=-1).flatten(-2)


def _within_rounding(got: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, rnd: tuple, exact: bool) -> bool:
    """Element by element: ``got`` equals ``ref`` (``exact``), or differs by at
    most :data:`ROUNDINGS` roundings (unit roundoff ``rnd[0]``) of the terms'
    magnitude ``mag``, plus as many subnormal steps ``rnd[1]`` (underflow)."""
    if got.shape != ref.shape:
        return False
    err = (got.double() - ref).abs()
    if exact:
        return bool((err == 0).all())
    u, sub = rnd
    return bool((err <= ROUNDINGS * (u * (1 + 4 * u) * mag + sub)).all())


def _leaf_value(leaf: Node, v: torch.Tensor, shape, stride, offset, g, *, exact: bool, is_table: bool):
    t = torch.empty_strided(shape, stride, dtype=v.dtype)
    n = t.untyped_storage().nbytes() // t.element_size()
    if exact and v.is_floating_point():
        flat = (torch.randint(-2, 3, (n,), generator=g).double() / 2 if is_table
                else torch.randint(-31, 32, (n,), generator=g).double() / 8)
    else:
        flat = torch.randn(n, generator=g)
    return flat.to(v.dtype).as_strided(shape, stride, offset)


def _evaluate_once(m: RopeMatch, q_pe_region, q_rot: Node, k_rot: Node, R: int, seed: int, exact: bool):
    """Run the subgraph once on fresh inputs; the (is_neox, k index) pairs it
    matches RoPE for (an empty list if none)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    syms = _token_symbols(*(fx.val(x) for x in m.leaves + m.eval_nodes))
    env = {s: 5 for s in syms}
    g = torch.Generator().manual_seed(seed)
    with unset_fake_temporarily(), torch.no_grad():
        values = {}
        for leaf in m.leaves:
            v = fx.val(leaf)
            shape = [_concrete(s, env) for s in v.shape]
            if leaf is m.positions:
                hi = _concrete(fx.val(m.cos_sin_cache).shape[0], env)
                values[leaf] = torch.randint(0, hi, shape, generator=g).to(v.dtype)
            else:
                values[leaf] = _leaf_value(leaf, v, shape, [_concrete(s, env) for s in v.stride()],
                                           _concrete(v.storage_offset(), env), g, exact=exact,
                                           is_table=leaf is m.cos_sin_cache)

        def get(a):
            if isinstance(a, Node):
                if a in values:
                    return values[a]
                v = fx.val(a)
                if isinstance(v, (torch.SymInt, int)):
                    return _concrete(v, env)
                raise KeyError(a)
            if isinstance(a, (list, tuple)):
                return type(a)(get(x) for x in a)
            if isinstance(a, torch.SymInt):
                return _concrete(a, env)
            return a

        try:
            for n in m.eval_nodes:
                values[n] = n.target(*get(n.args), **get(n.kwargs))
        except Exception as e:  # noqa: BLE001 - anything that does not evaluate is not our RoPE
            logger.debug("RoPE check: evaluating %s failed: %s", n, e)
            return []
        if q_rot not in values or k_rot not in values:
            return []
        qr = m.q_root
        qpe = values[qr].as_strided([_concrete(s, env) for s in q_pe_region.size],
                                    [_concrete(s, env) for s in q_pe_region.stride],
                                    _concrete(q_pe_region.offset, env))
        pos = values[m.positions]
        cos, sin = values[m.cos_sin_cache].index_select(0, pos.long()).double().chunk(2, dim=-1)
        # what the graph stores: the rotated q_pe goes into q (its dtype), the rotated k is
        # compared in the dtype of the k input the fused op rotates in place; the tolerance is
        # that dtype's rounding (an intermediate's dtype never widens it)
        got_q, got_k = values[q_rot].to(qpe.dtype), values[k_rot]
        rnd = _rounding_of({qpe.dtype})
        T = pos.shape[0]
        found = []
        for is_neox in (False, True):
            ref_q, mag_q = _rope64(qpe, cos[:, None, :], sin[:, None, :], is_neox)
            if not _within_rounding(got_q, ref_q, mag_q, rnd, exact):
                logger.debug("RoPE check: q is not %s RoPE to the rounding of %s (shapes %s %s)",
                             "NeoX" if is_neox else "GPT-J", qpe.dtype, tuple(got_q.shape), tuple(ref_q.shape))
                continue
            for j, n in enumerate(m.eval_nodes):
                v = values.get(n)
                if not fx.is_view(n) or not isinstance(v, torch.Tensor) or v.numel() != T * R \
                        or v.shape[-1] != R or v.dim() not in (2, 3):
                    continue
                ref_k, mag_k = _rope64(v.reshape(T, R), cos, sin, is_neox)
                if got_k.numel() == ref_k.numel() and _within_rounding(
                        got_k.to(v.dtype).reshape(T, R), ref_k, mag_k, _rounding_of({v.dtype}), exact):
                    found.append((is_neox, j))
        return found
