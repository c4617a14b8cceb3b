"""``MLAPassManager``: the mla-passes passes as one Inductor custom pass.

Use it as ``torch._inductor.config.post_grad_custom_post_pass`` (plain
Inductor) or wrap it in vLLM (the mla-passes plugin does). It runs, in order,
the QK-RoPE/KV-cache fusion and the decode q-prep lift on graphs of the
decode bucket (see :mod:`mla_passes.config` for the gating rules), records
``matched_counts`` of the last call, logs at debug level what matched and
why candidates did not, and dumps the graph before and after each pass
through ``lazy_format_graph_code`` (``mla_passes_before_<pass>`` /
``mla_passes_after_<pass>``) so depyf collects them.

The compile range of the graph being compiled comes from, in order:
:func:`compile_range` (a context manager for plain Inductor use), vLLM's pass
context when vLLM has set one, else none (then ``no_range_policy``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import sys
from dataclasses import dataclass

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph

from . import explain as _explain
from . import op_handles as _op_handles
from .config import PassConfig
from .passes import MLADecodeQPrepLiftPass, MLAQkRopeKVCacheFusionPass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenRange:
    """A compile range of token counts, inclusive at both ends (like vLLM's Range)."""

    start: int
    end: int


_current_range: list = []


@contextlib.contextmanager
def compile_range(r):
    """Compile graphs inside this block as the range ``r`` (``.start``/``.end``,
    or an int meaning ``(r, r)``)."""
    if isinstance(r, int):
        r = TokenRange(r, r)
    _current_range.append(r)
    try:
        yield r
    finally:
        _current_range.pop()


def _vllm_compile_range():
    mod = sys.modules.get("vllm.compilation.passes.inductor_pass")
    ctx = getattr(mod, "_pass_context", None) if mod is not None else None
    return getattr(ctx, "compile_range", None)


def current_compile_range():
    """The compile range in force, or None."""
    if _current_range:
        return _current_range[-1]
    return _vllm_compile_range()


@functools.lru_cache(maxsize=None)
def _source_hash(module_name: str, mtime_key: object) -> str:
    return hashlib.sha256(inspect.getsource(sys.modules[module_name]).encode()).hexdigest()


def _module_hash(module) -> str:
    import os

    path = getattr(module, "__file__", None)
    mtime = os.stat(path).st_mtime_ns if path else None
    return _source_hash(module.__name__, (path, mtime))


class MLAPassManager(CustomGraphPass):
    """The mla-passes passes, gated by compile range, as one CustomGraphPass."""

    def __init__(self, config: PassConfig | None = None, *, max_num_seqs: int | None = None,
                 num_speculative_tokens: int = 0):
        self.config = config if config is not None else PassConfig()
        self.max_num_seqs = max_num_seqs
        self.num_speculative_tokens = num_speculative_tokens or 0
        self.passes = []
        if self.config.fuse_aiter_qk_rope_kvcache_mla:
            self.passes.append(MLAQkRopeKVCacheFusionPass(
                backend=self.config.backend, raw_form=bool(self.config.fuse_rope_kvcache_cat_mla)))
            if self.config.lift_q_prep:
                self.passes.append(MLADecodeQPrepLiftPass(backend=self.config.backend))
        self.matched_counts: dict[str, int] = {p.name: 0 for p in self.passes}
        self.last_decision: str = "not called"

    # --- gating ----------------------------------------------------------------
    @property
    def decode_max_tokens(self) -> int | None:
        return self.config.decode_max_tokens(self.max_num_seqs, self.num_speculative_tokens)

    def is_applicable_for_range(self, r) -> bool:
        """True for a compile range inside the decode bucket (``r.end <= threshold``)."""
        limit = self.decode_max_tokens
        if not self.passes or limit is None or r is None:
            return False
        return r.end <= limit

    def _token_count_bound(self, graph: Graph):
        """Upper bound of the token count of ``graph`` (from an attention's q), or None."""
        from .passes import _fx

        handles = _op_handles.op_handles()
        for node in graph.nodes:
            call = _fx.as_op_call(node, handles.attention | handles.kv_cache_update | handles.fused_rope)
            if call is None:
                continue
            first = call.arg("q") if call.op in handles.attention else call.arg("positions") \
                if call.op in handles.fused_rope else call.arg("kv_c_normed")
            v = _fx.val(first)
            if not isinstance(v, torch.Tensor):
                continue
            t = v.shape[0]
            if isinstance(t, int):
                return t
            shape_env = t.node.shape_env
            upper = shape_env.bound_sympy(t.node.expr).upper
            return None if not upper.is_finite else int(upper)
        return None

    def _decide(self, graph: Graph) -> tuple[bool, str]:
        if not self.passes:
            return False, "no pass enabled"
        limit = self.decode_max_tokens
        if limit is None:
            return False, "decode bucket unknown (give max_num_seqs or aiter_qk_rope_kvcache_fusion_max_token_num)"
        r = current_compile_range()
        if r is not None:
            ok = self.is_applicable_for_range(r)
            return ok, f"compile range ({r.start}, {r.end}) {'within' if ok else 'outside'} decode bucket <= {limit}"
        policy = self.config.no_range_policy
        if policy == "apply":
            return True, "no compile range; policy 'apply'"
        if policy == "skip":
            return False, "no compile range; policy 'skip'"
        bound = self._token_count_bound(graph)
        if bound is None:
            return False, "no compile range; token count unbounded or unknown (policy 'infer')"
        ok = bound <= limit
        return ok, f"no compile range; token count <= {bound} {'within' if ok else 'outside'} bucket <= {limit}"

    # --- running ----------------------------------------------------------------
    @_explain.recorded  # writes what was decided where dumps go (mla-passes report)
    def __call__(self, graph: Graph) -> None:
        self.matched_counts = {p.name: 0 for p in self.passes}
        ok, why = self._decide(graph)
        self.last_decision = why
        if not ok:
            logger.debug("mla-passes: graph left alone: %s", why)
            return
        logger.debug("mla-passes: running %s: %s", [p.name for p in self.passes], why)
        from torch._dynamo.utils import lazy_format_graph_code

        gm = graph.owning_module
        for p in self.passes:
            if gm is not None:
                logger.debug("%s", lazy_format_graph_code(f"mla_passes_before_{p.name}", gm))
            self.matched_counts[p.name] = p(graph)
            if gm is not None:
                logger.debug("%s", lazy_format_graph_code(f"mla_passes_after_{p.name}", gm))
        logger.debug("mla-passes: matched %s", self.matched_counts)

    def uuid(self) -> str:
        """Changes whenever the rewrite can change: config, threshold, pass and
        pattern sources, the matched op set; stable otherwise."""
        from . import patterns

        modules = {sys.modules[__name__], sys.modules[PassConfig.__module__], _op_handles,
                   sys.modules[patterns.__name__]}
        for p in self.passes:
            modules.update(p.source_modules())
        modules.update(patterns.pattern_modules())
        state = {
            "config": self.config.as_dict(),
            "decode_max_tokens": self.decode_max_tokens,
            "range": None if (r := current_compile_range()) is None else (r.start, r.end),
            "passes": [p.name for p in self.passes],
            "ops": _op_handles.describe(),
            "sources": sorted((m.__name__, _module_hash(m)) for m in modules),
        }
        return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()
