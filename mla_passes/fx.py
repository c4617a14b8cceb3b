"""FX helpers shared by the passes and the patterns (a layer below both,
DESIGN §2): op calls in any form, aliasing regions, fake values for new
nodes, local dead-code removal.

An op that mutates its arguments appears in a post-grad graph in one of three
forms: a direct call (after a defunctionalization), ``auto_functionalized``
(v1: mutated values are ``getitem(node, 1 + i)``) or ``auto_functionalized_v2``
(mutated bases are ``getitem(node, 1 + j)`` of ``_all_bases``). :class:`OpCall`
hides the difference.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import sympy
import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.fx import Graph, Node

from . import ops

aten = torch.ops.aten

_OP_KIND: dict = {}  # id(target) -> (target, view, may alias)


def _op_kind(target) -> tuple[bool, bool]:
    """(view, may alias) of ``target``. A view: its schema says the result
    aliases the first argument (a non-writing alias annotation on both, as in
    ``view(Tensor(a) self) -> Tensor(a)`` or ``split(Tensor(a -> *) self) ->
    Tensor(a)[]``), the rule Inductor's ``reinplace.py`` reads, not a hand
    list. May alias: a pure op whose schema does not say so but whose value
    could still share its input's storage (``_unsafe_view``): storage
    identity decides; ops tagged ``pointwise`` always make a new tensor.
    Keyed by ``id``: ``OpOverload.__hash__`` is Python code, and this runs
    for every node the passes look at."""
    e = _OP_KIND.get(id(target))
    if e is not None and e[0] is target:
        return e[1], e[2]
    view = may_alias = False
    if isinstance(target, torch._ops.OpOverload):
        s = target._schema
        pure = not s.is_mutable
        args, rets = s.arguments, s.returns
        view = bool(pure and args and rets and args[0].alias_info is not None
                    and rets[0].alias_info is not None and not rets[0].alias_info.is_write)
        may_alias = pure and not view and torch.Tag.pointwise not in target.tags
    _OP_KIND[id(target)] = (target, view, may_alias)
    return view, may_alias


def same_storage(a: Node, b: Node) -> bool:
    """Whether the values of ``a`` and ``b`` share one storage (their fake
    tensors do exactly when the real ones will; a storage keeps one Python
    object, so identity is the test)."""
    va, vb = val(a), val(b)
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)
            and va.untyped_storage() is vb.untyped_storage())


def is_view(node: Node) -> bool:
    """Whether ``node``'s op is a view by its schema (see :func:`_op_kind`):
    its value aliases :func:`view_source` (``node``). Ops that alias without
    saying so in their schema (``_unsafe_view``) are found by storage
    identity in :func:`root_of` and :func:`aliases`."""
    if node.op != "call_function" or not node.args:
        return False
    if node.target is operator.getitem:  # a piece of a multi-output view (split, unbind, ...)
        src = node.args[0]
        return isinstance(src, Node) and src.op == "call_function" and _op_kind(src.target)[0]
    return _op_kind(node.target)[0]


def _aliases_source(node: Node) -> bool:
    """:func:`is_view`, or a pure op whose value shares its first argument's storage."""
    if is_view(node):
        return True
    if node.op != "call_function" or not node.args:
        return False
    if node.target is operator.getitem:
        src = node.args[0]
        return (isinstance(src, Node) and src.op == "call_function" and bool(src.args)
                and isinstance(src.args[0], Node) and _op_kind(src.target)[1] and same_storage(node, src.args[0]))
    return isinstance(node.args[0], Node) and _op_kind(node.target)[1] and same_storage(node, node.args[0])


def view_source(node: Node) -> Node:
    return node.args[0].args[0] if node.target is operator.getitem else node.args[0]


def root_of(node: Node) -> Node:
    """The node whose storage ``node`` aliases and that aliases no input."""
    while _aliases_source(node):
        node = view_source(node)
    return node


def aliases(root: Node) -> list[Node]:
    """``root`` and every node reached from it through values that alias
    their first argument: schema views (and the pieces of a multi-output
    view), or pure ops whose value shares ``root``'s storage (checked by
    identity). These are the graph values that share ``root``'s memory."""
    rv = val(root)
    storage = rv.untyped_storage() if isinstance(rv, torch.Tensor) else None

    def shares(u):
        v = val(u)
        return storage is not None and isinstance(v, torch.Tensor) and v.untyped_storage() is storage

    out, work, seen = [], [root], {root}
    while work:
        a = work.pop()
        out.append(a)
        for u in a.users:
            if u in seen or u.op != "call_function" or not u.args or u.args[0] is not a:
                continue
            if u.target is operator.getitem:
                ok = (a.op == "call_function" and _op_kind(a.target)[0]) or shares(u)
            else:
                view, may_alias = _op_kind(u.target)
                ok = view or (may_alias and shares(u))
            if ok:
                seen.add(u)
                work.append(u)
    return out


class NodeOrder:
    """Graph position as a sort key (``order[node]``), valid while nodes are
    inserted: FX nodes compare by their position in the graph."""

    def __getitem__(self, node: Node) -> Node:
        return node

    def get(self, node, default=None):
        return node if isinstance(node, Node) else default


def val(node) -> object:
    return node.meta.get("val") if isinstance(node, Node) else node


def _expr(x):
    """A size as a plain int when static, else its sympy expression."""
    if isinstance(x, torch.SymInt):
        e = x.node.expr
        return int(e) if e.is_Integer else e
    return x


@dataclass(frozen=True)
class Region:
    """The memory a tensor node covers: root node, sizes, strides, offset (sympy)."""

    root: Node
    size: tuple
    stride: tuple
    offset: object

    @staticmethod
    def of(node: Node) -> "Region | None":
        v = val(node)
        if not isinstance(v, torch.Tensor):
            return None
        return Region(root_of(node), tuple(_expr(s) for s in v.shape), tuple(_expr(s) for s in v.stride()),
                      _expr(v.storage_offset()))

    def slice_last(self, start, end) -> "Region":
        """This region sliced ``[start:end]`` along its last dim."""
        size = list(self.size)
        if isinstance(end, int) and end >= 2**62:
            end = size[-1]
        elif isinstance(end, int) and isinstance(size[-1], int):
            end = min(end, size[-1])
        size[-1] = end - start
        return Region(self.root, tuple(size), self.stride, self.offset + start * self.stride[-1])

    def same_elements(self, other: "Region | None") -> bool:
        """Whether both cover the same elements in the same order (unit dims,
        as ``unsqueeze`` adds, ignored)."""
        if other is None or self.root is not other.root or self.offset != other.offset:
            return False

        def dims(r):
            return [(n, st) for n, st in zip(r.size, r.stride) if n != 1]

        return dims(self) == dims(other)

    def disjoint_columns(self, other: "Region") -> bool:
        """True when both are row-major pieces of the same rows with
        non-overlapping column ranges (e.g. kv_c and k_pe of one projection)."""
        if self.root is not other.root:
            return True
        if len(self.stride) < 2 or len(other.stride) < 2 or self.stride[-1] != 1 or other.stride[-1] != 1:
            return False
        row = self.stride[-2]
        if other.stride[-2] != row or not (isinstance(row, int) and row > 0):
            return False
        a0, b0 = self.offset, other.offset
        if not (isinstance(a0, int) and isinstance(b0, int)):
            return False
        if not (isinstance(self.size[-1], int) and isinstance(other.size[-1], int)):
            return False
        a0, b0 = int(a0) % int(row), int(b0) % int(row)
        a1, b1 = a0 + self.size[-1], b0 + other.size[-1]
        return bool(a1 <= b0 or b1 <= a0)


class OpCall:
    """One call of ``op`` (direct, auto_functionalized or auto_functionalized_v2)."""

    def __init__(self, node: Node, op, form: str):
        self.node, self.op, self.form = node, op, form
        self.schema = op._schema

    def arg(self, name: str):
        if self.form == "direct":
            i, a = _schema_info(self.op).args.get(name, (None, None))
            if a is None:
                raise KeyError(name)
            if i < len(self.node.args):
                return self.node.args[i]
            return self.node.kwargs.get(name, a.default_value if a.has_default_value() else None)
        if self.form == "v2" and name in _schema_info(self.op).mutable:
            return self.mutable_input(name)
        return self.node.kwargs.get(name)

    def mutable_names(self) -> list[str]:
        return list(_schema_info(self.op).mutable)

    def mutable_input(self, name: str):
        """The node passed for mutable argument ``name`` (v2: its base, only
        when the argument is the base itself)."""
        if self.form != "v2":
            return self.arg(name)
        idx = self.node.kwargs.get(f"_{name}_base_index")
        if idx is None:
            return None
        if any(f"_{name}_{k}" in self.node.kwargs for k in ("size", "stride", "storage_offset", "slice_dim")):
            raise NotImplementedError(f"v2 view argument {name}")
        return self.node.kwargs["_all_bases"][idx]

    def output_users(self, index: int) -> list[Node]:
        """getitem users of this call's result ``index`` (functionalized forms)."""
        return [u for u in self.node.users if u.target is operator.getitem and u.args[1] == index]

    def mutated_value_getitems(self, name: str) -> list[Node]:
        """The getitems that stand for the value of mutable arg ``name`` after the call."""
        if self.form == "direct":
            return []
        if self.form == "v1":
            return self.output_users(1 + self.mutable_names().index(name))
        idx = self.node.kwargs.get(f"_{name}_base_index")
        return [] if idx is None else self.output_users(1 + idx)


@dataclass(frozen=True)
class _SchemaInfo:
    args: dict     # name -> (position, Argument), first of a name wins
    mutable: tuple  # names of the arguments the op writes, in schema order


_SCHEMA_INFO: dict = {}


def _schema_info(op) -> _SchemaInfo:
    """``op``'s arguments by name (schemas are walked once per op, not per lookup)."""
    info = _SCHEMA_INFO.get(op)
    if info is None:
        args: dict = {}
        for i, a in enumerate(op._schema.arguments):
            args.setdefault(a.name, (i, a))
        mutable = tuple(a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write)
        info = _SCHEMA_INFO[op] = _SchemaInfo(args, mutable)
    return info


def as_op_call(node: Node, ops) -> OpCall | None:
    if node.op != "call_function":
        return None
    if node.target in ops:
        return OpCall(node, node.target, "direct")
    if node.target is auto_functionalized and node.args and node.args[0] in ops:
        return OpCall(node, node.args[0], "v1")
    if node.target is auto_functionalized_v2 and node.args and node.args[0] in ops:
        return OpCall(node, node.args[0], "v2")
    return None


def find_op_calls(graph: Graph, ops) -> list[OpCall]:
    """Every call of one of ``ops`` (any form), in graph order. Looks the
    candidates up in the graph's (op, target) index instead of visiting
    every node."""
    cands = []
    for t in (*ops, auto_functionalized, auto_functionalized_v2):
        cands.extend(graph.find_nodes(op="call_function", target=t, sort=False))
    cands.sort()  # fx nodes order by their position in the graph
    return [c for n in cands if (c := as_op_call(n, ops)) is not None]


def fake_mode_of(*nodes):
    from torch._guards import detect_fake_mode

    return detect_fake_mode([val(n) for n in nodes if isinstance(val(n), torch.Tensor)])


def graph_fake_mode(graph: Graph):
    """The fake mode of ``graph``'s values (its placeholders', or the tracing
    context's), or None. A pass computes it once per graph and hands it to
    :func:`call` instead of detecting it per new node."""
    return fake_mode_of(*graph.find_nodes(op="placeholder"))


def _fake_impls() -> dict:
    """Our ops' Python fake impls, called directly: going through the
    dispatcher in fake mode costs far more per node (cache keys over opaque args)."""
    return {
        torch.ops.mla_passes.mla_decode_q_prep.default: ops._decode_q_prep_fake,
        torch.ops.mla_passes.mla_fused_decode_prep.default: ops._fused_decode_prep_fake,
        torch.ops.mla_passes.mla_attention_with_prepped_q.default: ops._attention_with_prepped_q_fake,
        aten.unsqueeze.default: lambda x, d: x.unsqueeze(d),
        aten.squeeze.dim: lambda x, d: x.squeeze(d),
        aten.slice.Tensor: lambda x, d, a, b: x[(slice(None),) * (x.dim() + d if d < 0 else d) + (slice(a, b),)],
        aten.reshape.default: lambda x, s: x.reshape(s),
    }


def _fresh_outs() -> dict:
    """Ops whose one output is a new tensor (its own storage): target ->
    ``fn(*args) -> (like, shape, dtype)`` (the op's ``*_out_spec`` in ops.py,
    which its fake impl also uses)."""
    return {
        torch.ops.mla_passes.mla_decode_q_prep.default: ops._decode_q_prep_out_spec,
        torch.ops.mla_passes.mla_fused_decode_prep.default: ops._fused_decode_prep_out_spec,
    }


def fresh_fake(mode, like: torch.Tensor, shape, dtype) -> torch.Tensor:
    """What ``like.new_empty(shape, dtype=dtype)`` gives under fake ``mode``
    (a new contiguous FakeTensor with its own storage on ``like``'s device):
    a meta tensor wrapped by the ``FakeTensor`` constructor, cheaper than
    dispatching ``torch.empty`` through the mode (cache key and cache entry)."""
    with unset_fake_temporarily():
        meta = torch.empty(shape, dtype=dtype, layout=like.layout, device="meta")
    return FakeTensor(mode, meta, like.device)


_FAKE: dict = {}
_FRESH: dict = {}


def call(graph: Graph, target, args, kwargs=None, *, fake_mode=None) -> Node:
    """Insert ``target(*args)`` at the graph's insert point with ``meta["val"]``
    (``fake_mode``: the graph's, from :func:`graph_fake_mode`; else detected
    from the arguments)."""
    if not _FAKE:
        _FAKE.update(_fake_impls())
        _FRESH.update(_fresh_outs())
    node = graph.call_function(target, tuple(args), kwargs or {})
    if isinstance(target, torch._ops.OpOverload) and not target._schema.returns:
        node.meta["val"] = None  # what its fake impl gives: an op that returns nothing
        return node
    fa = torch.fx.node.map_arg(node.args, val)
    fk = torch.fx.node.map_arg(node.kwargs, val)
    mode = fake_mode or fake_mode_of(*node.all_input_nodes)
    spec = _FRESH.get(target)
    if spec is not None and mode is not None:
        like, shape, dtype = spec(*fa, **fk)
        if isinstance(like, FakeTensor) and like.fake_mode is mode:
            node.meta["val"] = fresh_fake(mode, like, shape, dtype)
            return node
    fn = _FAKE.get(target, target)
    if mode is not None:
        with mode:
            node.meta["val"] = fn(*fa, **fk)
    else:
        node.meta["val"] = fn(*fa, **fk)
    return node


def erase_dead(graph: Graph, nodes) -> set:
    """Erase ``nodes`` that have no users, then inputs that became dead
    (pure nodes only: never placeholders or ops with side effects). Returns
    the erased nodes."""
    work = list(nodes)
    explicit = set(work)
    erased = set()
    seen = set()
    keep_ops = ("placeholder", "output", "get_attr")
    while work:
        n = work.pop()
        if n in seen or n.users or n.graph is not graph or n.op in keep_ops:
            continue
        if n.op == "call_function" and n not in explicit and _impure(n):
            continue
        seen.add(n)
        inputs = n.all_input_nodes
        graph.erase_node(n)
        erased.add(n)
        work.extend(inputs)
    return erased


_IMPURE: dict = {}


def _impure(n: Node) -> bool:
    t = n.target
    if t is operator.getitem:
        return False
    p = _IMPURE.get(t)
    if p is None:
        if t in (auto_functionalized, auto_functionalized_v2):
            p = True
        elif isinstance(t, torch._ops.OpOverload):
            p = t._schema.is_mutable or t.namespace not in ("aten", "prims")
        else:
            p = True
        _IMPURE[t] = p
    return p


