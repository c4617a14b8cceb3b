"""Find what breaks CUDA-graph capture in a decode graph.

A decode step is replayed from a captured CUDA graph: every launch, every
buffer size and every pointer is fixed at capture. A graph that is to be
captured must therefore hold no

* op whose output *shape* depends on tensor data (``nonzero``, ``unique``,
  ``masked_select``, ``x[bool_mask]``, ``repeat_interleave`` without
  ``output_size``, ...): the fake impl has to invent an unbacked size (``u0``);
* host sync (``item``, ``tolist``, ``_local_scalar_dense``, ``equal``,
  ``histc`` with its default range, ...): the host reads device memory in the
  middle of the step;
* host transfer (``x.cpu()``, ``x.to("cpu")``, a CPU constant copied to the
  device by ``_to_copy``/``copy_``): a copy between host and device memory,
  a sync on the way out, a host buffer a replay would not refresh on the way
  in; a copy that stays on one device is fine;
* op whose fake output shape depends on more than its inputs' shapes - a
  symbol in the output that no input carries, or (live graphs) a custom op's
  fake impl that now returns another shape than the one recorded at trace
  time (it reads state besides its inputs: the invariant-1 bug of DESIGN §4.2).

:func:`lint_graph` checks a live ``fx.Graph``/``GraphModule`` (reading
``meta["val"]``, or dynamo's ``meta["example_value"]``), :func:`lint_source`
the text of a dumped graph file (``print_readable`` / depyf; it reads the
``"f32[u0, 4]"`` annotations, and devices where the file prints them,
``"f32[4][1]cuda:0"``). :class:`CudaGraphLintPass` runs the check as an
Inductor post-grad pass (``CustomGraphPass``, so also vLLM's
``post_grad_custom_post_pass``): it logs findings, keeps them in
``.findings``, and raises with ``strict=True``. It never changes the graph.

``mla-passes lint DUMP_OR_GRAPH...`` (:func:`run`) checks one graph file or
every graph file of a depyf dump folder with :func:`lint_path`. Exit status:
0 clean, 1 findings, 2 bad input.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import sys
from pathlib import Path
from typing import Iterable

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from .graph_files import _split_top_level, collect_graph_files, is_graph_source, parse_graph_source

logger = logging.getLogger(__name__)

DYNAMIC_SHAPE = "dynamic-shape"
HOST_SYNC = "host-sync"
FAKE_SHAPE = "fake-shape"
CUDAGRAPH_UNSAFE = "cudagraph-unsafe"
HOST_TRANSFER = "host-transfer"

# Per-op knowledge, keyed by the op's base name (``aten.nonzero.default``,
# ``torch.nonzero`` and ``Tensor.nonzero`` all have base name ``nonzero``).
# Aten ops not listed here are still caught through their tags
# (``dynamic_output_shape``, ``data_dependent_output``, ``cudagraph_unsafe``).
DYNAMIC_SHAPE_OPS = frozenset({
    "nonzero", "nonzero_numpy", "argwhere", "unique", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "masked_select", "bincount", "repeat_interleave",
})
HOST_SYNC_OPS = frozenset({
    "item", "tolist", "_local_scalar_dense", "equal", "is_nonzero", "numpy", "__bool__",
    "__int__", "__float__",
})
# Ops that take index tensors: a bool index is a hidden nonzero().
MASK_INDEX_OPS = frozenset({"index", "_unsafe_index", "index_put", "index_put_", "_unsafe_index_put", "getitem",
                            "__getitem__", "__setitem__", "setitem"})
# Ops that may copy between devices: a finding when the source and destination
# devices differ (or the destination is the host and the source unknown).
TRANSFER_OPS = frozenset({"_to_copy", "to", "cpu", "cuda", "device_put", "copy", "copy_", "_copy_from",
                          "_copy_from_and_resize"})
# Tagged dynamic_output_shape, but only dynamic in the case handled above.
_TAGGED_BUT_CONDITIONAL = frozenset({"index", "repeat_interleave"})


@dataclasses.dataclass(frozen=True)
class Finding:
    """One reason a graph cannot be captured: ``node`` (its name in the graph)
    calls ``op``; ``kind`` is one of the module constants."""

    node: str
    op: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.node}: {self.op}: [{self.kind}] {self.message}"


@dataclasses.dataclass
class _View:
    """What the rules need of one node, from either a live graph or a file."""

    name: str
    op: str                        # display name of the op (wrapped op for auto_functionalized)
    base: str                      # base name: "nonzero"
    overload: object | None        # the OpOverload where known
    in_vals: list[object]          # FakeTensor / SymInt in live graphs, annotation strings in files
    index_vals: list[object]       # the index tensors of an index-taking op
    out_val: object | None
    has_output_size: bool = False
    node: fx.Node | None = None
    # the call's arguments: values (FakeTensor, constants) in live graphs,
    # annotation strings (for node names) or source text (literals) in files
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)


# --- op names ----------------------------------------------------------------

def _base_name(op: str) -> str:
    """``aten.nonzero.default`` / ``torch.ops.aten.nonzero`` / ``torch.nonzero``
    / ``Tensor.nonzero`` / ``nonzero`` -> ``nonzero``."""
    op = op.removeprefix("torch.ops.")
    parts = op.split(".")
    if len(parts) >= 3 and parts[0] not in ("torch", "Tensor", "operator", "_operator"):
        return parts[1]  # namespace.name.overload
    if len(parts) == 2 and parts[0] not in ("torch", "Tensor", "operator", "_operator", "builtins"):
        return parts[1]  # namespace.name (packet)
    return parts[-1]


def _overload_from_name(op: str):
    """The OpOverload for ``ns.name.overload`` if it resolves (never raises)."""
    parts = op.removeprefix("torch.ops.").split(".")
    if len(parts) != 3:
        return None
    try:
        return getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
    except (AttributeError, RuntimeError):
        return None


def _tags(overload) -> set:
    return set(getattr(overload, "tags", ()) or ())


# --- the rules ---------------------------------------------------------------

_BOOL_ANN = re.compile(r"^b8\[")
_SYM = re.compile(r"\b([us]\d+)\b")
_SHAPE_PART = re.compile(r"\[([^\]]*)\]|Sym\(([^)]*)\)")  # "u8[u0, 4]" -> "u0, 4" (u8 is a dtype)


def _is_bool(val) -> bool:
    if isinstance(val, str):
        return bool(_BOOL_ANN.match(val))
    return isinstance(val, torch.Tensor) and val.dtype == torch.bool


def _symbols(val) -> set[str]:
    """Names of the size symbols in ``val`` (a tensor, SymInt, list of them, or
    an annotation string)."""
    if val is None:
        return set()
    if isinstance(val, str):
        return {s for m in _SHAPE_PART.finditer(val) for part in m.groups() if part for s in _SYM.findall(part)}
    from torch.fx.experimental.symbolic_shapes import free_symbols

    try:
        return {str(s) for s in free_symbols(val)}
    except Exception:  # noqa: BLE001 - values of unknown kinds carry no symbols
        return set()


_DEVICE_TYPES = ("cpu", "cuda", "xpu", "hip", "mps", "meta")
_DEVICE_CALL = re.compile(r"device\(type=['\"](\w+)['\"](?:,\s*index=(\d+))?\)")
_DEVICE_WORD = re.compile(r"^['\"]?((?:%s)(?::\d+)?)['\"]?$" % "|".join(_DEVICE_TYPES))
_ANN_DEVICE = re.compile(r"\]\s*((?:%s)(?::\d+)?)\s*$" % "|".join(_DEVICE_TYPES))


def _device(x) -> str | None:
    """``"cpu"`` / ``"cuda:0"`` / ``"cuda"`` for a tensor, a device, a device
    literal (``'cpu'``, ``device(type='cuda', index=0)``) or an annotation
    that prints one (``"f32[4][1]cuda:0"``); None when it says nothing."""
    if isinstance(x, torch.Tensor):
        return str(x.device)
    if isinstance(x, torch.device):
        return str(x)
    if not isinstance(x, str):
        return None
    x = x.strip()
    m = _DEVICE_CALL.search(x)
    if m:
        return m.group(1) + (f":{m.group(2)}" if m.group(2) else "")
    m = _DEVICE_WORD.match(x) or _ANN_DEVICE.search(x)
    return m.group(1) if m else None


def _same_device(a: str, b: str) -> bool:
    """``cuda`` matches any ``cuda:i``; two indices must be equal."""
    (ta, _, ia), (tb, _, ib) = a.partition(":"), b.partition(":")
    return ta == tb and (not ia or not ib or ia == ib)


def _arg(v: _View, i: int, name: str, default=None):
    if name in v.kwargs:
        return v.kwargs[name]
    return v.args[i] if len(v.args) > i else default


def _transfer(v: _View) -> tuple[str | None, str | None]:
    """(source device, destination device) of a possible cross-device copy."""
    if v.base in ("copy", "copy_", "_copy_from_and_resize", "_copy_from"):
        src, dst = (0, 1) if v.base.startswith("_copy_from") else (1, 0)
        return _device(_arg(v, src, "src" if src else "self")), (_device(v.out_val) or _device(_arg(v, dst, "dst")))
    dst = _device(v.out_val) or _device(v.kwargs.get("device"))
    if dst is None and v.base in ("to", "device_put"):
        dst = next((d for d in map(_device, v.args[1:]) if d is not None), None)
    if dst is None and v.base in ("cpu", "cuda"):
        dst = v.base
    return (_device(v.args[0]) if v.args else None), dst


def _number(x) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return None


def _check(v: _View) -> list[Finding]:
    tags = _tags(v.overload)
    tag_names = {getattr(t, "name", str(t)) for t in tags}
    if v.base in MASK_INDEX_OPS and any(_is_bool(x) for x in v.index_vals):
        return [Finding(v.name, v.op, DYNAMIC_SHAPE,
                        "boolean-mask indexing: the result size is the number of True elements (a hidden nonzero)")]
    if v.base == "repeat_interleave":
        if not v.has_output_size and (v.overload is None or "dynamic_output_shape" in tag_names):
            return [Finding(v.name, v.op, DYNAMIC_SHAPE,
                            "repeat_interleave with tensor repeats and no output_size: data-dependent output size")]
    elif v.base in DYNAMIC_SHAPE_OPS or (
        "dynamic_output_shape" in tag_names and v.base not in _TAGGED_BUT_CONDITIONAL
    ):
        return [Finding(v.name, v.op, DYNAMIC_SHAPE, "output shape depends on tensor data")]
    if v.base in HOST_SYNC_OPS or "data_dependent_output" in tag_names:
        return [Finding(v.name, v.op, HOST_SYNC, "copies a device value to the host (sync inside the step)")]
    if v.base == "histc":
        lo, hi = _number(_arg(v, 2, "min", 0)), _number(_arg(v, 3, "max", 0))
        if lo is not None and lo == hi:
            return [Finding(v.name, v.op, HOST_SYNC,
                            "histc with min == max (the default) takes its range from the data: it reads "
                            "the min and max back to the host")]
    if v.base in TRANSFER_OPS:
        src, dst = _transfer(v)
        if dst is not None and (src is not None and not _same_device(src, dst)
                                or src is None and dst == "cpu" and v.base not in ("copy", "copy_")):
            return [Finding(v.name, v.op, HOST_TRANSFER,
                            f"copies a tensor from {src or 'an unknown device'} to {dst}: a host transfer "
                            "inside the step (a sync to the host, or a host buffer a replay does not refresh)")]
    if "cudagraph_unsafe" in tag_names:
        return [Finding(v.name, v.op, CUDAGRAPH_UNSAFE, "op is tagged cudagraph_unsafe")]
    # A symbol in the output that no input carries. An input of unknown value
    # (a tuple-valued node in a file has no annotation) gives no verdict.
    known = v.base != "getitem" and all(x is not None for x in v.in_vals)
    extra = _symbols(v.out_val) - set().union(*(_symbols(x) for x in v.in_vals)) if known else set()
    if extra:
        return [Finding(v.name, v.op, FAKE_SHAPE,
                        f"output shape uses {', '.join(sorted(extra))}, which no input shape carries: "
                        "the fake impl depends on more than its inputs' shapes")]
    if v.node is not None:
        f = _recheck_fake(v)
        if f is not None:
            return [f]
    return []


# --- live graphs -------------------------------------------------------------

def _val(node) -> object | None:
    if not isinstance(node, fx.Node):
        return node if isinstance(node, (torch.SymInt, torch.SymFloat)) else None
    return node.meta.get("val", node.meta.get("example_value"))


def _fx_op_name(node: fx.Node) -> tuple[str, object | None, tuple, dict]:
    """(display name, OpOverload or None, args, kwargs) of a call node, with
    ``auto_functionalized(op, **kw)`` read as ``op(**kw)``."""
    t = node.target
    if isinstance(t, torch._ops.HigherOrderOperator) and t.name().startswith("auto_functionalized") and node.args:
        inner = node.args[0]
        return str(inner), inner, tuple(node.args[1:]), dict(node.kwargs)
    if isinstance(t, torch._ops.OpOverload):
        return str(t), t, node.args, node.kwargs
    if isinstance(t, torch._ops.OpOverloadPacket):
        return f"{t._qualified_op_name.replace('::', '.')}", None, node.args, node.kwargs
    if node.op == "call_method":
        return f"Tensor.{t}", None, node.args, node.kwargs
    name = getattr(t, "__name__", str(t))
    mod = getattr(t, "__module__", "") or ""
    if mod.startswith("torch") and not mod.startswith("torch._ops"):
        name = f"torch.{name}"
    elif mod in ("_operator", "operator"):
        name = f"operator.{name}" if name != "getitem" else "getitem"
    return name, None, node.args, node.kwargs


def _flat_nodes(x) -> list:
    out: list = []
    fx.node.map_aggregate(x, lambda a: out.append(a) or a)
    return out


def _recheck_fake(v: _View) -> Finding | None:
    """Re-run a custom op's fake impl on the recorded input values; a different
    output shape than the recorded one means the fake reads other state."""
    op = v.overload
    if not isinstance(op, torch._ops.OpOverload) or op.namespace in ("aten", "prims", "_c10d_functional"):
        return None
    node = v.node
    out = _val(node)
    if not isinstance(out, torch.Tensor) or node.target is not op:
        return None
    from torch._guards import detect_fake_mode

    def as_val(a):
        if isinstance(a, fx.Node):
            val = _val(a)
            if val is None:
                raise LookupError
            return val
        return a

    try:
        args = fx.node.map_aggregate(node.args, as_val)
        kwargs = fx.node.map_aggregate(node.kwargs, as_val)
        mode = detect_fake_mode(_flat_nodes((args, kwargs)))
        if mode is None:
            return None
        with mode:
            new = op(*args, **kwargs)
    except Exception:  # noqa: BLE001 - cannot re-run (opaque inputs, missing meta): no verdict
        return None
    if isinstance(new, torch.Tensor) and tuple(new.shape) != tuple(out.shape):
        return Finding(v.name, v.op, FAKE_SHAPE,
                       f"fake impl now returns shape {tuple(new.shape)} for the same inputs, traced "
                       f"{tuple(out.shape)}: it depends on more than its inputs' shapes")
    return None


def _fx_views(graph: fx.Graph) -> Iterable[_View]:
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        op, overload, args, kwargs = _fx_op_name(node)
        base = _base_name(op)
        inputs = _flat_nodes((args, kwargs))
        in_vals = [_val(a) for a in inputs if isinstance(a, (fx.Node, torch.SymInt, torch.SymFloat))]
        index_vals: list = []
        if base in MASK_INDEX_OPS and len(args) > 1:
            index_vals = [_val(a) for a in _flat_nodes(args[1]) if isinstance(a, fx.Node)]
        as_val = lambda a: _val(a) if isinstance(a, fx.Node) else a  # noqa: E731
        yield _View(
            name=node.name, op=op, base=base, overload=overload, in_vals=in_vals, index_vals=index_vals,
            out_val=_val(node), has_output_size=kwargs.get("output_size") is not None, node=node,
            args=tuple(as_val(a) for a in args), kwargs={k: as_val(a) for k, a in kwargs.items()},
        )


def lint_graph(graph: fx.Graph | fx.GraphModule) -> list[Finding]:
    """Findings for a live graph (reads ``meta["val"]``/``meta["example_value"]``)."""
    if isinstance(graph, fx.GraphModule):
        graph = graph.graph
    return [f for v in _fx_views(graph) for f in _check(v)]


# --- dumped graph files ------------------------------------------------------

def _text_views(parsed) -> Iterable[_View]:
    anns = {n.name: n.val for n in parsed.nodes}
    for n in parsed.nodes:
        if n.target in ("placeholder", "alias"):
            continue
        op = n.target
        base = _base_name(op)
        overload = _overload_from_name(op)
        index_vals: list = []
        if base in MASK_INDEX_OPS:
            if n.target == "getitem":
                inner = n.rhs[n.rhs.index("[") + 1 : n.rhs.rindex("]")] if "[" in n.rhs else ""
            else:
                parts = _split_top_level(n.rhs[n.rhs.index("(") + 1 : n.rhs.rindex(")")]) if "(" in n.rhs else []
                inner = ",".join(parts[1:2])
            index_vals = [anns.get(x) for x in re.findall(r"[A-Za-z_]\w*", inner) if x in anns]
        args, kwargs = _text_call_args(n, anns, _split_top_level)
        yield _View(
            name=n.name, op=op, base=base, overload=overload,
            in_vals=[anns.get(a) for a in n.args], index_vals=index_vals, out_val=n.val,
            has_output_size="output_size" in n.rhs, args=args, kwargs=kwargs,
        )


_KWARG = re.compile(r"^([A-Za-z_]\w*)\s*=\s*(.+)$", re.S)


def _text_call_args(n, anns: dict, split) -> tuple[tuple, dict]:
    """Arguments of a call line: a node name becomes its annotation (None
    when unannotated), anything else stays source text; a method call's
    receiver is the first argument."""
    rhs = n.rhs
    if "(" not in rhs or not rhs.endswith(")"):
        return (), {}
    callee, inner = rhs[: rhs.index("(")], rhs[rhs.index("(") + 1 : -1]
    args: list = []
    kwargs: dict = {}
    if n.target.startswith("Tensor.") and "." in callee:
        args.append(callee.rsplit(".", 1)[0].strip())
    for part in split(inner) if inner.strip() else []:
        m = _KWARG.match(part.strip())
        if m and not part.strip().startswith("device("):
            kwargs[m.group(1)] = m.group(2).strip()
        else:
            args.append(part.strip())
    val = lambda a: anns.get(a, a) if a in anns else a  # noqa: E731
    return tuple(val(a) for a in args), {k: val(a) for k, a in kwargs.items()}


def lint_source(src: str) -> list[Finding]:
    """Findings for the text of one graph file (``print_readable`` output or a
    depyf dump file)."""
    return [f for v in _text_views(parse_graph_source(src)) for f in _check(v)]


def lint_path(path: str | Path) -> dict[str, list[Finding]]:
    """Lint one graph file, or every graph file of a dump folder (kernel and
    bytecode files skipped): ``{file: findings}``."""
    path = Path(path)
    if path.is_dir():
        files = sorted(collect_graph_files(path).values())
    else:
        files = [path]
    out: dict[str, list[Finding]] = {}
    for p in files:
        src = p.read_text()
        if path.is_dir() or is_graph_source(src):
            out[str(p)] = lint_source(src)
        else:
            raise ValueError(f"lint: {p} holds no FX graph (no 'def forward(self, ...)')")
    return out


# --- as a pass ---------------------------------------------------------------

class CudaGraphLintError(RuntimeError):
    pass


class CudaGraphLintPass(CustomGraphPass):
    """Run :func:`lint_graph` as a post-grad pass. Leaves the graph unchanged;
    logs one warning per finding, keeps the findings of the last call in
    ``.findings`` and, with ``strict=True``, raises :class:`CudaGraphLintError`."""

    def __init__(self, *, strict: bool = False):
        self.strict = strict
        self.findings: list[Finding] = []

    def __call__(self, graph: fx.Graph) -> None:
        self.findings = lint_graph(graph)
        for f in self.findings:
            logger.warning("mla-passes lint: %s", f)
        if self.strict and self.findings:
            raise CudaGraphLintError(
                "graph cannot be captured in a CUDA graph:\n" + "\n".join(f"  {f}" for f in self.findings)
            )

    def is_applicable_for_range(self, compile_range) -> bool:  # vLLM InductorPass protocol
        return True

    def uuid(self) -> str:
        h = hashlib.sha256(Path(__file__).read_bytes())
        h.update(repr(self.strict).encode())
        return h.hexdigest()


# --- the command ----------------------------------------------------------------

HELP = "flag ops that break CUDA-graph capture (dynamic shapes, host syncs) in a dumped graph or dump folder"


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="DUMP_OR_GRAPH",
                        help="a graph file (print_readable / depyf) or a depyf dump folder")
    parser.add_argument("--stage", default=None,
                        help="in dump folders, only files whose name contains STAGE (e.g. AFTER_POST_GRAD)")
    parser.add_argument("--json", action="store_true", help="print findings as JSON")


def run(args) -> int:
    results: dict[str, list] = {}
    for p in args.paths:
        if not Path(p).exists():
            print(f"mla-passes lint: error: argument DUMP_OR_GRAPH: {p}: no such file or folder", file=sys.stderr)
            return 2
        try:
            found = lint_path(p)
        except (ValueError, UnicodeDecodeError) as e:
            print(f"mla-passes lint: {e}", file=sys.stderr)
            return 2
        for f, findings in found.items():
            if args.stage is None or args.stage in Path(f).name:
                results[f] = findings
    if not results:  # nothing linted is not "clean"
        where = " ".join(args.paths)
        if args.stage is not None:
            print(f"mla-passes lint: error: argument --stage: {args.stage!r} matches no graph file in {where}",
                  file=sys.stderr)
        else:
            print(f"mla-passes lint: error: argument DUMP_OR_GRAPH: no graph file in {where}", file=sys.stderr)
        return 2
    n = sum(len(v) for v in results.values())
    if args.json:
        print(json.dumps({
            "files": {f: [vars(x) for x in v] for f, v in results.items()},
            "num_files": len(results), "num_findings": n,
        }, indent=2))
    else:
        for f, findings in results.items():
            for x in findings:
                print(f"{f}: {x}")
        print(f"{n} finding{'s' if n != 1 else ''} in {len(results)} graph file{'s' if len(results) != 1 else ''}")
    return 1 if n else 0
