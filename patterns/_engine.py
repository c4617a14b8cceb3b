"""Named Inductor patterns whose matches feed a plan instead of a rewrite.

Inductor's pattern matcher (``torch._inductor.pattern_matcher``) usually
replaces what it matches. The mla-passes rewrites span several matches per
layer (two RoPE rotations, a cache update, a scatter into q, the attention)
and are planned, checked and applied procedurally; so here every pattern is
registered with ``register_graph_pattern`` into one ``PatternMatcherPass``
per :class:`PatternSet`, with its guards in ``extra_check(match)`` (reading
``meta["val"]``), and its handler only records a :class:`Hit` (pattern name,
matched root, bound nodes). The passes read the hits.

:meth:`PatternSet.match` walks the registered ``(op, target)`` keys of the
patterns it is asked for (the anchors: a few targets, few nodes), and
:meth:`PatternSet.match_at` tries patterns at one given node (a RoPE output
the plan points at), so common root targets (``view``, ``add``, ``cat``) are
never scanned graph-wide. Both do that itself
rather than calling ``PatternMatcherPass.apply``: ``apply`` needs a
``GraphModule`` (its ``GraphTransformObserver``; the pass manager and the
bench hand over a bare ``Graph``), keeps mutation-region ids and skips CPU
nodes when C++ codegen is off, all of which guard *replacements*. Nothing
here changes the graph, so the loop is the engine's, minus that bookkeeping:
``entry.pattern.match(node)``, ``entry.extra_check(match)``, ``entry.apply``.

Pattern sets are built once per process (``functools.lru_cache`` on the
builder), never per graph.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

from torch._inductor.pattern_matcher import (
    CallFunction,
    CallFunctionVarArgs,
    GraphPatternEntry,
    Match,
    MatchContext,
    PatternExpr,
    PatternMatcherPass,
    PatternPrettyPrinter,
    is_match,
)
from torch.fx import Graph, Node

from mla_passes import fx

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    """One match of a registered pattern: its name, the node the pattern is
    rooted at, and the nodes/values it bound (``KeywordArg`` names)."""

    name: str
    root: Node
    kwargs: dict
    nodes: tuple

    def __getitem__(self, key):
        return self.kwargs[key]


@dataclass
class RegisteredPattern:
    """What ``mla-passes patterns`` lists: a name, what it matches, and its
    variants (one Inductor ``PatternExpr`` each, all registered)."""

    name: str
    module: str
    doc: str
    variants: list = field(default_factory=list)

    def pretty(self) -> list[str]:
        """Each variant as Python source of the pattern expression."""
        return [_pretty(p) for p in self.variants]


def _pretty(p: PatternExpr) -> str:
    if isinstance(p, CallFunctionVarArgs):  # the printer does not know it: any arguments, read by name later
        return f"pattern = CallFunctionVarArgs({', '.join(map(str, p.fns))})"
    try:
        return PatternPrettyPrinter.run(p, output_name="pattern")
    except Exception as e:  # noqa: BLE001 - show why rather than fail the listing
        return f"# not printable: {e}\n{p!r}"


class Hits:
    """The hits of one :meth:`PatternSet.match` call, by root node."""

    def __init__(self):
        self.by_root: dict[Node, list[Hit]] = {}
        self.by_name: dict[str, list[Hit]] = {}
        self.tried: set = set()
        self.pattern_set: PatternSet | None = None

    def add(self, hit: Hit) -> None:
        self.by_root.setdefault(hit.root, []).append(hit)
        self.by_name.setdefault(hit.name, []).append(hit)

    def at(self, node, prefix: str = "") -> Hit | None:
        """The first hit rooted at ``node`` whose name starts with ``prefix``."""
        for h in self.by_root.get(node, ()):
            if h.name.startswith(prefix):
                return h
        return None

    def named(self, name: str) -> list[Hit]:
        return self.by_name.get(name, [])

    def counts(self) -> Counter:
        return Counter({k: len(v) for k, v in self.by_name.items()})


class PatternSet:
    """Named patterns registered into one ``PatternMatcherPass``."""

    def __init__(self, pass_name: str, module: str):
        self.pm_pass = PatternMatcherPass(pass_name=pass_name)
        self.module = module
        self.registered: dict[str, RegisteredPattern] = {}
        self._names: dict = {}   # id(entry) -> pattern name (entries are unhashable dataclasses)
        self._shapes: dict = {}  # id(entry) -> [_Shape] of earlier matches
        self._local = threading.local()  # .sink: the Hits being filled (compiles may run in threads)

    def register(self, name: str, doc: str, pattern: PatternExpr, extra_check=None) -> None:
        """Register ``pattern`` (one variant of ``name``); a match that passes
        ``extra_check`` is recorded as a :class:`Hit` named ``name``."""
        reg = self.registered.setdefault(name, RegisteredPattern(name, self.module, doc))
        reg.variants.append(pattern)

        def record(match: Match, *args, **kwargs):
            sink = getattr(self._local, "sink", None)
            if sink is not None:
                sink.add(Hit(name, match.output_node(), dict(match.kwargs), tuple(match.nodes)))

        # what register_graph_pattern does, keeping the entry to know its name
        entry = GraphPatternEntry(pattern=pattern, extra_check=extra_check or (lambda m: True), handler=record)
        entry.register(self.pm_pass)
        self._names[id(entry)] = name

    def match(self, graph: Graph, names) -> Hits:
        """Every hit of the patterns ``names`` in ``graph`` (the graph is not changed)."""
        hits = Hits()
        for (op, target), entries in self.pm_pass.patterns.items():
            mine = [e for e in entries if self._names.get(id(e)) in names]
            if mine:
                for node in graph.find_nodes(op=op, target=target, sort=False):
                    self._try(node, mine, hits)
        return hits

    def match_at(self, node: Node, hits: Hits, names) -> None:
        """Try the patterns ``names`` rooted at ``node``; add what matches to ``hits``."""
        if node in hits.tried:
            return
        hits.tried.add(node)
        entries = self.pm_pass.patterns.get((node.op, node.target), ())
        mine = [e for e in entries if self._names.get(id(e)) in names]
        if mine:
            self._try(node, mine, hits)

    def _try(self, node: Node, entries, hits: Hits) -> None:
        self._local.sink = hits
        try:
            for entry in entries:
                m = _Shape.replay(self._shapes.get(id(entry), ()), node, entry.pattern)
                if m is None:
                    if not _may_match(entry.pattern, node, 2):
                        continue
                    m = entry.pattern.match(node)
                    if not is_match(m):
                        continue
                    # newest first, at most 4: a process that compiles other graphs
                    # before this one still learns this one's layer shape
                    if (shape := _Shape.of(m, node)) is not None:
                        shapes = self._shapes.setdefault(id(entry), [])
                        shapes.insert(0, shape)
                        del shapes[4:]
                try:
                    ok = bool(entry.extra_check(m))
                except Exception as e:  # noqa: BLE001 - a guard that cannot decide refuses
                    logger.debug("pattern guard failed at %s: %s", node.name, e)
                    ok = False
                if ok:
                    entry.apply(m, node.graph, node)
        finally:
            self._local.sink = None


def _layer_name_bound(m) -> bool:
    return isinstance(m.kwargs.get("layer_name"), (Node, str))


def register_op_anchor(ps: PatternSet, name: str, doc: str, ops, *, direct: bool = True) -> None:
    """Register a call of any op in ``ops`` as pattern ``name``: the
    ``auto_functionalized`` v1/v2 forms (guard: a ``layer_name`` is bound), and
    with ``direct`` the plain call (``CallFunctionVarArgs``: the op's arguments
    are read through :class:`mla_passes.passes.fx.OpCall`)."""
    from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2
    from torch._inductor.pattern_matcher import MULTIPLE, CallFunction, CallFunctionVarArgs, KeywordArg

    for op in sorted(ops, key=str):
        ps.register(name, doc, CallFunction([auto_functionalized, auto_functionalized_v2], op,
                                            layer_name=KeywordArg("layer_name"), _users=MULTIPLE),
                    _layer_name_bound)
        if direct:
            ps.register(name, doc, CallFunctionVarArgs(op))


def anchor_calls(hits: Hits, names, ops) -> list:
    """The calls the anchors ``names`` matched, as :class:`mla_passes.passes.fx.OpCall`
    views, in graph order."""
    roots = {h.root for name in names for h in hits.named(name)}
    return [c for n in sorted(roots) if (c := fx.as_op_call(n, ops)) is not None]


class _Shape:
    """The shape of one match, to recognise the same subgraph at the next layer.

    Inductor's matcher builds a ``MatchContext``, a ``Match`` and a pytree
    flatten per pattern node for every RoPE match; a 61-layer model repeats
    one subgraph 122 times. A match is recorded as its nodes' targets,
    literal arguments (all of them, including those the pattern ignores or
    binds: stricter than the pattern), references between matched nodes,
    user counts (stricter than ``_users``) and the positions of the bound
    nodes. :meth:`replay` follows that record from a new root; when every
    node, literal, reference and user count agrees, the new subgraph is
    isomorphic to one the pattern matched, so the pattern matches it with
    the bindings read off the same positions. Anything else goes to the
    matcher. The ``extra_check`` guards run on every match either way.
    """

    __slots__ = ("steps", "const_kwargs", "node_names")

    def __init__(self, steps, const_kwargs, node_names):
        self.steps = steps            # [(target, arg template, kwarg template, n_users or None)], parents first
        self.const_kwargs = const_kwargs
        self.node_names = node_names  # the names bound to nodes

    @staticmethod
    def of(m: Match, root: Node) -> "_Shape | None":
        """The record of match ``m`` rooted at ``root`` (None if it cannot be replayed)."""
        inside = set(m.nodes)
        nodes, index = [root], {root: 0}
        for n in nodes:  # breadth first: every node after one that references it
            for a in n.all_input_nodes:
                if a in inside and a not in index:
                    index[a] = len(nodes)
                    nodes.append(a)
        if len(nodes) != len(inside):
            return None
        bound: dict = {}  # node -> the names bound to it (one node may carry several)
        for k, v in m.kwargs.items():
            if isinstance(v, Node):
                bound[v] = bound.get(v, ()) + (k,)

        def item(a):
            if isinstance(a, Node):
                if a in index:
                    return ("N", index[a])
                return ("K", bound[a]) if a in bound else ("X", None)
            return ("L", a)

        steps = []
        for n in nodes:
            struct, flat = _flatten(n.args, n.kwargs)
            steps.append((n.target, struct, tuple(item(a) for a in flat), None if n is root else len(n.users)))
        return _Shape(steps, {k: v for k, v in m.kwargs.items() if not isinstance(v, Node)},
                      frozenset(k for names in bound.values() for k in names))

    @staticmethod
    def replay(shapes, root: Node, pattern) -> Match | None:
        for shape in shapes:
            got = shape._follow(root)
            if got is not None:
                nodes, kwargs = got
                ctx = MatchContext([pattern], graph=root.graph)
                ctx.pattern_to_node[pattern] = root
                m = Match(ctx, pattern, kwargs=kwargs)
                m.nodes.extend(reversed(nodes))
                return m
        return None

    def _follow(self, root: Node):
        nodes = [None] * len(self.steps)
        nodes[0] = root
        kwargs = dict(self.const_kwargs)
        seen = {root}
        for i, (target, struct, items, n_users) in enumerate(self.steps):
            n = nodes[i]
            if n is None or n.op != "call_function" or n.target is not target:
                return None
            if n_users is not None and len(n.users) != n_users:
                return None
            got_struct, flat = _flatten(n.args, n.kwargs)
            if got_struct != struct:
                return None
            for (kind, t), a in zip(items, flat):
                is_node = isinstance(a, Node)
                if kind == "L":
                    if is_node or type(a) is not type(t) or a != t:
                        return None
                elif not is_node:
                    return None
                elif kind == "N":
                    cur = nodes[t]
                    if cur is None:
                        if a in seen:
                            return None
                        nodes[t] = a
                        seen.add(a)
                    elif cur is not a:
                        return None
                elif kind == "K":
                    for name in t:
                        if kwargs.setdefault(name, a) is not a:
                            return None
        if len(kwargs) != len(self.const_kwargs) + len(self.node_names):
            return None
        return nodes, kwargs


def _may_match(p, a, depth: int) -> bool:
    """False when ``a`` cannot match ``p``: a ``CallFunction``'s target or
    argument count differs, down to ``depth`` levels (a subset of the checks
    Inductor's matcher makes, without its ``MatchContext``; patterns that
    never match a layer, e.g. the fused-rope scatter on a raw graph, are
    turned away here at every layer)."""
    if not isinstance(p, CallFunction):
        return True
    if not isinstance(a, Node) or a.op != "call_function" or a.target not in p.fns_set \
            or len(a.args) != len(p.args):
        return False
    if depth > 1:
        for pa, aa in zip(p.args, a.args):
            if isinstance(pa, CallFunction) and not _may_match(pa, aa, depth - 1):
                return False
    return True


def _flatten(args, kwargs):
    """(structure, leaves) of a node's arguments: lists/tuples/dicts opened,
    the structure a hashable description of the nesting."""
    if not kwargs and not any(isinstance(a, (list, tuple, dict)) for a in args):
        return len(args), list(args)  # the common flat call (an int never equals a nested structure)
    flat: list = []

    def go(a):
        if isinstance(a, (list, tuple)):
            return (type(a), tuple(go(x) for x in a))
        if isinstance(a, dict):
            return (dict, tuple((k, go(v)) for k, v in a.items()))
        flat.append(a)
        return None

    return (go(args), go(kwargs)), flat
