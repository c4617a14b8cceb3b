"""Decode-bucket gating (DESIGN §4.3), in one place.

The lift and fusion passes only pay off, and are only tuned, for decode-sized
graphs. This module owns every rule that decides whether they run on a graph:

* the threshold formula, :func:`decode_threshold`:
  ``aiter_qk_rope_kvcache_fusion_max_token_num`` if set, else
  ``max_num_seqs * (1 + num_speculative_tokens)`` (the decode CUDA-graph
  bucket). The vLLM plugin calls this same function to add the threshold to
  ``compile_ranges_endpoints``;
* the compile range of the graph being compiled, :func:`current_compile_range`:
  the innermost :func:`compile_range` block of the calling thread (plain
  Inductor use, tests; a block in one thread is not seen by another, so two
  threads compiling at once each gate, and key the cache, by their own
  range), else
  vLLM's pass context through its public ``get_pass_context()`` (vLLM 0.32
  asserts when no context is set: that reads as "no range"); vLLM is never
  imported here;
* the policy for a graph compiled with no range (plain Inductor, vLLM on
  CPU), :data:`NO_RANGE_POLICIES`:

  - ``"infer"`` (default): read the token count from the graph: apply when it
    is static and within the bucket, or symbolic with a finite upper bound
    within the bucket (an unbounded dynamic graph, such as torch.compile's
    automatic-dynamic recompile, is left alone);
  - ``"apply"``: always apply (correct for every row by invariant 1; prefill
    rows then also run the decode q-prep, which costs time);
  - ``"skip"``: never apply.

:class:`DecodeGate` combines them. The pass manager asks it once per graph
(:meth:`DecodeGate.decide`); each pass exposes the same
``is_applicable_for_range`` as vLLM's passes do, answered by the gate, and
does not gate again when called.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from dataclasses import dataclass

import torch
from torch.fx import Graph

from . import fx
from .op_handles import op_handles
from .vllm.tables import INDUCTOR_PASS_MODULES

NO_RANGE_POLICIES = ("infer", "apply", "skip")



@dataclass(frozen=True)
class TokenRange:
    """A compile range of token counts, inclusive at both ends (like vLLM's ``Range``)."""

    start: int
    end: int


def decode_threshold(max_num_seqs: int | None, num_speculative_tokens: int = 0,
                     override: int | None = None) -> int | None:
    """Largest token count of the decode bucket, or None when unknown.

    ``override`` (``aiter_qk_rope_kvcache_fusion_max_token_num``) wins; else
    ``max_num_seqs * (1 + num_speculative_tokens)``.
    """
    if override is not None:
        return override
    if max_num_seqs is None:
        return None
    return max_num_seqs * (1 + (num_speculative_tokens or 0))


# --- the compile range in force ------------------------------------------------------

# The open compile_range() blocks, innermost last. A context variable, not a
# module global: each thread (and each asyncio task) sees only its own blocks.
_range_stack: contextvars.ContextVar[tuple] = contextvars.ContextVar("mla_passes_compile_range", default=())


@contextlib.contextmanager
def compile_range(r):
    """Compile graphs inside this block as the range ``r`` (anything with int
    ``.start``/``.end``, ``0 <= start <= end``, or an int meaning ``(r, r)``).
    Blocks nest; the innermost wins. A block holds for the thread (or
    asyncio task) that opened it only. An empty or negative range is an error
    (it would otherwise read as inside the decode bucket)."""
    if isinstance(r, int) and not isinstance(r, bool):
        r = TokenRange(r, r)
    if not (hasattr(r, "start") and hasattr(r, "end")):
        raise TypeError(f"compile_range: argument 'r' must be an int or have .start/.end, got {r!r}")
    for what in ("start", "end"):
        v = getattr(r, what)
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"compile_range: argument 'r' must have an int .{what}, got {v!r}")
    if r.start < 0 or r.end < 0:
        raise ValueError(f"compile_range: argument 'r' must be a range of token counts >= 0, got "
                         f"({r.start}, {r.end})")
    if r.start > r.end:
        raise ValueError(f"compile_range: argument 'r' is empty (start {r.start} > end {r.end})")
    token = _range_stack.set((*_range_stack.get(), r))
    try:
        yield r
    finally:
        _range_stack.reset(token)


def vllm_compile_range():
    """The compile range vLLM is compiling for, or None (vLLM not loaded, or
    no pass context set: plain Inductor, vLLM on CPU)."""
    for name in INDUCTOR_PASS_MODULES:  # where vLLM keeps its pass context, newest first
        mod = sys.modules.get(name)
        get = getattr(mod, "get_pass_context", None) if mod is not None else None
        if get is None:
            continue
        try:
            ctx = get()
        except AssertionError:  # vLLM 0.32: `assert _pass_context is not None`
            return None
        return getattr(ctx, "compile_range", None) if ctx is not None else None
    return None


def current_compile_range():
    """The compile range in force in this thread: the innermost :func:`compile_range`, else vLLM's, else None."""
    stack = _range_stack.get()
    if stack:
        return stack[-1]
    return vllm_compile_range()


# --- the token count a graph serves ----------------------------------------------------

def _finite_int(x) -> int | None:
    """``x`` as an int when it is a finite integer (sympy or Python), else None.
    torch's ``int_oo`` says ``is_finite`` but is no integer: None."""
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    if getattr(x, "is_Integer", False):
        return int(x)
    return None


def token_count_bound(graph: Graph) -> int | None:
    """Upper bound of the token count of ``graph`` (the first dim of the first
    MLA attention's q, cache update's kv_c or fused-rope op's positions), or
    None when unbounded or when the graph holds no MLA op."""
    handles = op_handles()
    for call in fx.find_op_calls(graph, handles.attention | handles.kv_cache_update | handles.fused_rope):
        if call.op in handles.attention:
            first = call.arg("q")
        elif call.op in handles.fused_rope:
            first = call.arg("positions")
        else:
            first = call.arg("kv_c_normed")
        v = fx.val(first)
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            continue
        t = v.shape[0]
        if not isinstance(t, torch.SymInt):
            return int(t)
        expr = t.node.expr
        if expr.is_Integer:
            return int(expr)
        return _finite_int(t.node.shape_env.bound_sympy(expr).upper)
    return None


# --- the gate -------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeGate:
    """Whether the passes apply to a graph: its compile range within the
    decode bucket, or ``no_range_policy`` when there is no range."""

    threshold: int | None
    no_range_policy: str = "infer"

    def __post_init__(self) -> None:
        if self.no_range_policy not in NO_RANGE_POLICIES:
            raise ValueError(f"DecodeGate: argument 'no_range_policy' must be one of {NO_RANGE_POLICIES}, "
                             f"got {self.no_range_policy!r}")

    def is_applicable_for_range(self, r) -> bool:
        """True for a compile range inside the decode bucket (``r.end <= threshold``)."""
        if self.threshold is None or r is None:
            return False
        end = _finite_int(r.end)
        return end is not None and end <= self.threshold

    def decide(self, graph: Graph, r=None) -> tuple[bool, str]:
        """(apply?, why) for ``graph`` compiled in range ``r`` (default: the
        range in force, :func:`current_compile_range`)."""
        limit = self.threshold
        if limit is None:
            return False, "decode bucket unknown (give max_num_seqs or aiter_qk_rope_kvcache_fusion_max_token_num)"
        if r is None:
            r = current_compile_range()
        if r is not None:
            ok = self.is_applicable_for_range(r)
            return ok, f"compile range ({r.start}, {r.end}) {'within' if ok else 'outside'} decode bucket <= {limit}"
        policy = self.no_range_policy
        if policy == "apply":
            return True, "no compile range; policy 'apply'"
        if policy == "skip":
            return False, "no compile range; policy 'skip'"
        bound = token_count_bound(graph)
        if bound is None:
            return False, "no compile range; token count unbounded or unknown (policy 'infer')"
        ok = bound <= limit
        return ok, f"no compile range; token count <= {bound} {'within' if ok else 'outside'} bucket <= {limit}"


__all__ = ["DecodeGate", "NO_RANGE_POLICIES", "TokenRange", "compile_range", "current_compile_range",
           "decode_threshold", "token_count_bound", "vllm_compile_range"]
