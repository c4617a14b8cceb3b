"""Read and pair FX graph files: what ``print_readable`` writes and depyf
dumps hold. Used by ``mla-passes diff`` (:mod:`.diff`), ``mla-passes dump``
(:mod:`.dump`) and the CUDA-graph lint in text mode (:mod:`.lint`).

A *graph file* is what ``GraphModule.print_readable`` writes and what depyf
leaves in its dump folder (``depyf.prepare_debug``) - one ``def forward`` whose
body has one line per node::

    add: "f32[10]" = torch.ops.aten.add.Tensor(abs_1, 1);  abs_1 = None

depyf names the files of one compiled function ``__compiled_fn_<N>.<Stage>.<k>.py``
(older depyf: spaces instead of dots, ``__compiled_fn_<N> Captured Graph <k>.py``).
``<Stage>`` is a fixed stage (``AFTER_POST_GRAD``, ``Forward_graph``, ...) or
whatever name a pass gave ``lazy_format_graph_code`` (ours:
``mla_passes_before_<pass>`` / ``mla_passes_after_<pass>``); dynamo's own
captured graph gets a stage with a fresh uuid in it. ``<N>`` is a process-wide
counter, so two dumps made in one process number their functions differently;
``<k>`` counts distinct contents written under one name.

Pairing therefore keys a file by (rank of ``<N>`` among the dump's compiled
functions, stage with uuids and ``__compiled_fn_<N>`` removed, ``<k>``).
Normalizing a graph drops comments, the ``;  x = None`` tails and renumbers
node names by order of definition per base name (``add_7`` -> ``add_2`` when it
is the third ``add``), so a node inserted or removed upstream does not ripple
through the whole text diff. Op counts read ops wrapped in
``auto_functionalized`` / ``auto_functionalized_v2`` as the op they wrap.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from pathlib import Path

# --- parsing one graph file --------------------------------------------------

_UUID = re.compile(r"[0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12}")
_DEF = re.compile(r"^(\s*)def forward\(self(?P<params>.*?)\)\s*(?:->.*)?:\s*$")
_PARAM = re.compile(r"(?P<name>[A-Za-z_]\w*)\s*(?::\s*\"(?P<ann>[^\"]*)\")?")
_ASSIGN = re.compile(r"^(?P<indent>\s*)(?P<lhs>[A-Za-z_]\w*)\s*(?::\s*\"(?P<ann>[^\"]*)\")?\s*=\s*(?P<rhs>.*)$")
_NONE_TAIL = re.compile(r";\s+(?:[A-Za-z_]\w*\s*=\s*)+None\s*$")
_CALL = re.compile(r"^(?P<callee>[A-Za-z_][\w.]*)\(")
_SUBSCRIPT = re.compile(r"^(?P<base>[A-Za-z_]\w*)\[")
_IDENT = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?!\w)")
_WRAPPERS = ("torch.ops.higher_order.auto_functionalized", "torch.ops.higher_order.auto_functionalized_v2")
_BINOPS = (" + ", " - ", " * ", " / ", " // ", " % ", " ** ", " @ ", " == ", " != ", " < ", " > ", " <= ", " >= ", " & ", " | ")


@dataclasses.dataclass
class GraphNode:
    """One node line of a graph file.

    ``target`` is the op as a string: ``aten.add.Tensor`` for ``torch.ops``
    calls (``torch.ops.`` stripped; for ``auto_functionalized(op, ...)`` the
    wrapped op, with ``wrapped`` set), ``getitem`` for ``x[i]``,
    ``Tensor.<method>`` for method calls on a node, the callee for other calls
    (``torch.abs``), ``operator.<op>`` for infix expressions, ``placeholder``.
    ``val`` is the type annotation (``"f32[4, 2]"``), None when absent.
    """

    name: str
    target: str
    rhs: str = ""
    val: str | None = None
    args: tuple[str, ...] = ()
    wrapped: bool = False
    line: int = 0

    @property
    def op(self) -> str:
        return "placeholder" if self.target == "placeholder" else "call"


@dataclasses.dataclass
class ParsedGraph:
    path: str | None
    nodes: list[GraphNode]
    outputs: tuple[str, ...] = ()

    def by_name(self) -> dict[str, GraphNode]:
        return {n.name: n for n in self.nodes}

    def op_counts(self) -> collections.Counter:
        """Count of call nodes per target (``auto_functionalized`` unwrapped;
        placeholders, ``getitem`` and plain aliases not counted)."""
        return collections.Counter(
            n.target for n in self.nodes if n.target not in ("placeholder", "getitem", "alias")
        )


def _split_top_level(s: str) -> list[str]:
    """Split ``s`` on commas that are not inside brackets or quotes."""
    out, depth, cur, quote = [], 0, [], None
    for ch in s:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _strip_strings(s: str) -> str:
    return re.sub(r"\"[^\"]*\"|'[^']*'", '""', s)


def _target_of(rhs: str, defined: set[str]) -> tuple[str, bool]:
    rhs = rhs.strip()
    m = _CALL.match(rhs)
    if m:
        callee = m.group("callee")
        if callee in _WRAPPERS:
            inner = _split_top_level(rhs[len(callee) + 1 : rhs.rindex(")")])
            if inner and inner[0].startswith("torch.ops."):
                return inner[0][len("torch.ops."):], True
            return callee[len("torch.ops."):], False
        if callee.startswith("torch.ops."):
            return callee[len("torch.ops."):], False
        head, _, method = callee.partition(".")
        if method and head in defined and "." not in method:
            return f"Tensor.{method}", False
        return callee, False
    if _SUBSCRIPT.match(rhs):
        return "getitem", False
    for op in _BINOPS:
        if op in _strip_strings(rhs):
            return f"operator.{op.strip()}", False
    if rhs.startswith("-"):
        return "operator.neg", False
    return "alias", False


def parse_graph_source(src: str, path: str | None = None) -> ParsedGraph:
    """Parse the text of one graph file (``print_readable`` output, a depyf
    dump, or a ``TRACED GRAPH`` log block). Only the first ``forward`` is read."""
    nodes: list[GraphNode] = []
    defined: set[str] = set()
    outputs: tuple[str, ...] = ()
    lines = src.splitlines()
    i, body_indent, anon = 0, None, 0
    while i < len(lines):
        line = lines[i]
        if body_indent is None:
            # A long signature may be wrapped over several lines.
            if re.match(r"^\s*def forward\(self", line):
                sig, j = line, i
                while not re.search(r"\)\s*(?:->.*)?:\s*$", sig) and j + 1 < len(lines):
                    j += 1
                    sig += " " + lines[j].strip()
                m = _DEF.match(sig)
                if m:
                    for p in _split_top_level(m.group("params").lstrip(", ")):
                        pm = _PARAM.match(p.lstrip("*"))
                        if pm:
                            nodes.append(GraphNode(pm.group("name"), "placeholder", val=pm.group("ann"), line=i + 1))
                            defined.add(pm.group("name"))
                    body_indent = len(m.group(1)) + 4
                i = j + 1
                continue
            i += 1
            continue
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped and indent < body_indent:
            break  # end of forward
        i += 1
        if not stripped or stripped.startswith("#"):
            continue
        code = _NONE_TAIL.sub("", stripped)
        if code.startswith("return"):
            ret = code[len("return"):].strip().strip("()[]")
            outputs = tuple(x.strip() for x in _split_top_level(ret))
            break
        m = _ASSIGN.match(code)
        if m and not code.startswith(("torch.", "assert ")):
            name, ann, rhs = m.group("lhs"), m.group("ann"), m.group("rhs")
        else:
            name, ann, rhs = f"_stmt_{anon}", None, code
            anon += 1
        target, wrapped = _target_of(rhs, defined)
        args = tuple(dict.fromkeys(x for x in _IDENT.findall(_strip_strings(rhs)) if x in defined))
        if target == "alias" and ann is None and len(args) == 1 and rhs.strip() == args[0]:
            ann = next(n.val for n in reversed(nodes) if n.name == args[0])  # `l_x_ = L_x_`
        nodes.append(GraphNode(name, target, rhs=rhs, val=ann, args=args, wrapped=wrapped, line=i))
        defined.add(name)
    return ParsedGraph(path, nodes, outputs)


def parse_graph_file(path: str | os.PathLike) -> ParsedGraph:
    return parse_graph_source(Path(path).read_text(), str(path))


def is_graph_source(src: str) -> bool:
    return bool(re.search(r"^\s*def forward\(self", src, re.M)) and "class " in src


# --- normalizing -------------------------------------------------------------

_BASE = re.compile(r"^(?P<base>.*?)(?:_\d+)?$")


def normalize_graph_source(src: str) -> str:
    """The graph text with comments, blank lines, ``= None`` tails and header
    imports dropped, uuids masked and node names renumbered by order of
    definition (per base name)."""
    graph = parse_graph_source(src)
    counters: collections.Counter = collections.Counter()
    rename: dict[str, str] = {}
    for n in graph.nodes:
        base = _BASE.match(n.name).group("base") or n.name
        k = counters[base]
        counters[base] += 1
        rename[n.name] = base if k == 0 else f"{base}_{k}"

    def sub_names(text: str, *, kwargs: bool) -> str:
        pattern = r"(?<![\w.])([A-Za-z_]\w*)(?!\w)" + (r"(?!\s*=(?!=))" if kwargs else "")
        return re.sub(pattern, lambda m: rename.get(m.group(1), m.group(1)), text)

    out = []
    for line in src.splitlines():
        s = line.rstrip()
        if not s.strip() or s.strip().startswith("#"):
            continue
        if s.strip() in ("from __future__ import annotations", "import torch", "from torch import device"):
            continue
        s = _NONE_TAIL.sub("", s)
        s = _UUID.sub("<uuid>", s)
        m = _ASSIGN.match(s)
        if m and m.group("lhs") in rename:
            ann = f': "{m.group("ann")}"' if m.group("ann") is not None else ""
            s = f"{m.group('indent')}{rename[m.group('lhs')]}{ann} = {sub_names(m.group('rhs'), kwargs=True)}"
        elif s.lstrip().startswith("def forward"):
            head, _, params = s.partition("(")
            s = head + "(" + sub_names(params, kwargs=False)
        else:
            s = sub_names(s, kwargs=True)
        out.append(s)
    return "\n".join(out) + "\n"


# --- pairing the files of two dumps ------------------------------------------

_OUR_NAME = re.compile(r"^mla_passes_graph\.(?P<pid>\d+)\.(?P<n>\d+)\.(?P<side>before|after)\.py$")
_DEPYF_NAME = re.compile(r"^(?P<fn>__compiled_fn_(?P<n>\d+))[ .](?P<stage>.+)[ .](?P<k>\d+)\.py$")


@dataclasses.dataclass(frozen=True)
class GraphKey:
    fn: int          # rank of __compiled_fn_<N> among the dump's compiled functions
    stage: str       # normalized stage name
    k: int           # depyf's content counter for that name

    def __str__(self) -> str:
        return f"fn{self.fn}.{self.stage}.{self.k}"


def _stage_name(fn: str, stage: str) -> str:
    stage = stage.replace(" ", "_")
    stage = _UUID.sub("<uuid>", stage)
    if stage == f"{fn}_<uuid>" or stage == "Captured_Graph":
        return "Captured_Graph"
    return stage.replace(fn + "_", "").replace(fn, "")


def collect_graph_files(folder: str | os.PathLike) -> dict[GraphKey, Path]:
    """The graph files of a depyf dump folder, keyed for pairing (also the
    ``mla_passes_graph.<pid>.<n>.<before|after>.py`` files the passes write
    into vLLM's ``debug_dump_path`` on CPU, stage ``mla_passes_before`` /
    ``mla_passes_after``). Kernel files,
    ``full_code_for_*`` and ``__transformed_code_*`` are skipped (not FX graphs);
    other ``.py`` files that hold a graph are keyed by their file name."""
    folder = Path(folder)
    found: list[tuple[int, str, int, Path]] = []
    others: list[Path] = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix != ".py":
            continue
        m = _DEPYF_NAME.match(p.name)
        ours = _OUR_NAME.match(p.name)
        if ours:
            # mla_passes_graph.<pid>.<n>.<before|after>.py (mla_passes.records):
            # keyed like a depyf function, (pid, n) ranked together with depyf's <N>.
            n = int(ours.group("pid")) * 1_000_000 + int(ours.group("n"))
            found.append((n, f"mla_passes_{ours.group('side')}", 0, p))
        elif m:
            stage = m.group("stage")
            if re.fullmatch(r"kernel[ _]\d+", stage) or stage.startswith("kernel"):
                continue
            found.append((int(m.group("n")), _stage_name(m.group("fn"), stage), int(m.group("k")), p))
        elif not p.name.startswith(("full_code_for_", "__transformed_code_", "fx_graph_code_")):
            others.append(p)
    ranks = {n: r for r, n in enumerate(sorted({f[0] for f in found}))}
    keyed = {GraphKey(ranks[n], stage, k): p for n, stage, k, p in found}
    for p in others:
        try:
            src = p.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        if is_graph_source(src):
            keyed[GraphKey(-1, _UUID.sub("<uuid>", p.stem), 0)] = p
    return keyed
