"""``MLAPassManager``: the mla-passes passes as one Inductor custom pass.

Use it as ``torch._inductor.config.post_grad_custom_post_pass`` (plain
Inductor) or wrap it in vLLM (the mla-passes plugin does). It asks its
:class:`~mla_passes.gating.DecodeGate` once per graph whether the graph is in
the decode bucket (all gating rules: :mod:`mla_passes.gating`), then runs, in
order, the QK-RoPE/KV-cache fusion and the decode q-prep lift, records
``matched_counts`` of the last call, logs at debug level what matched and
why candidates did not, and dumps the graph before and after each pass
through ``lazy_format_graph_code`` (``mla_passes_before_<pass>`` /
``mla_passes_after_<pass>``) so depyf collects them.

``uuid()`` covers everything a rewrite depends on at compile time, so
Inductor's FX graph cache never serves a graph rewritten for another setup:
the config, the threshold and compile range, the pass and pattern sources,
the matched op set, and the compile-time facts of the registered layers
(cache dtype, whether q is quantized: they choose the prepped q's dtype).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import sys
import time

from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph

from . import records as _explain
from . import op_handles as _op_handles
from .config import PassConfig, PassConfigError, check_int
from .gating import DecodeGate, TokenRange, compile_range, current_compile_range  # noqa: F401 (re-exported)
from .layers import local_layers
from .passes import MLADecodeQPrepLiftPass, MLAQkRopeKVCacheFusionPass
from .passes.attention import compile_time_facts
from .patterns import pattern_modules

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _source_hash(module_name: str, mtime_key: object) -> str:
    return hashlib.sha256(inspect.getsource(sys.modules[module_name]).encode()).hexdigest()


def _module_hash(module) -> str:
    import os

    path = getattr(module, "__file__", None)
    mtime = os.stat(path).st_mtime_ns if path else None
    return _source_hash(module.__name__, (path, mtime))


def _in_dependency_order(graph: Graph) -> bool:
    """Put the nodes in an order where each follows its inputs, when they are not.

    vLLM runs our manager after its own fusion passes and before its cleanup
    (``PostCleanupPass``), which is where it sorts the graph: Inductor's pattern
    matcher does not promise an ordered graph, and vLLM's MLA RoPE/KV-cache
    fusion leaves its fused op before the kv_c RMSNorm it reads in models with
    q_lora (DeepSeek-V3/R1, Kimi K2). Our passes reason about "defined before
    the fusion point" in list order, so they need the order the graph will
    have. ``stable_topological_sort`` is the sort vLLM's cleanup runs next:
    on an ordered graph it changes nothing; on an unordered one the result is
    what the cleanup would have produced anyway. False when the graph has no
    such order (a cycle): the passes then leave it alone."""
    seen: set = set()
    for n in graph.nodes:
        if any(a not in seen for a in n.all_input_nodes):
            from torch._inductor.pattern_matcher import stable_topological_sort

            try:
                stable_topological_sort(graph)
            except Exception as e:  # no order exists; never fail the user's compile
                logger.debug("mla-passes: graph has no dependency order (%s: %s); left alone", type(e).__name__, e)
                return False
            logger.debug("mla-passes: graph was not in dependency order (a fusion before ours left it so); sorted")
            return True
        seen.add(n)
    return True


class MLAPassManager(CustomGraphPass):
    """The mla-passes passes, gated by compile range, as one CustomGraphPass."""

    def __init__(self, config: PassConfig | None = None, *, max_num_seqs: int | None = None,
                 num_speculative_tokens: int = 0):
        if config is None:
            config = PassConfig()
        if not isinstance(config, PassConfig):
            raise PassConfigError(f"MLAPassManager: argument 'config' must be a PassConfig, got {config!r}")
        config.validate()  # fields may have been assigned after construction
        check_int("MLAPassManager", "max_num_seqs", max_num_seqs, minimum=1, optional=True)
        check_int("MLAPassManager", "num_speculative_tokens", num_speculative_tokens, minimum=0)
        self.config = config
        self.max_num_seqs = max_num_seqs
        self.num_speculative_tokens = num_speculative_tokens
        self.gate = DecodeGate(config.decode_max_tokens(max_num_seqs, num_speculative_tokens),
                               config.no_range_policy)
        self.passes = []
        if config.fuse_aiter_qk_rope_kvcache_mla:
            self.passes.append(MLAQkRopeKVCacheFusionPass(
                backend=config.backend, raw_form=bool(config.fuse_rope_kvcache_cat_mla), gate=self.gate))
            if config.lift_q_prep:
                self.passes.append(MLADecodeQPrepLiftPass(gate=self.gate))
        self.matched_counts: dict[str, int] = {p.name: 0 for p in self.passes}
        self.pass_ms: dict[str, float] = {}  # wall time of each pass in the last call (as vLLM's time_and_log)
        self.last_decision: str = "not called"

    # --- gating (rules in mla_passes.gating) ---------------------------------------
    @property
    def decode_max_tokens(self) -> int | None:
        return self.gate.threshold

    def is_applicable_for_range(self, r) -> bool:
        """True for a compile range inside the decode bucket (``r.end <= threshold``)."""
        return bool(self.passes) and self.gate.is_applicable_for_range(r)

    def _decide(self, graph: Graph) -> tuple[bool, str]:
        if not self.passes:
            return False, "no pass enabled"
        return self.gate.decide(graph)

    # --- running ----------------------------------------------------------------
    @_explain.recorded  # writes what was decided where dumps go (mla-passes report)
    def __call__(self, graph: Graph) -> None:
        self.matched_counts = {p.name: 0 for p in self.passes}
        self.pass_ms = {}
        ok, why = self._decide(graph)
        self.last_decision = why
        if not ok:
            logger.debug("mla-passes: graph left alone: %s", why)
            return
        logger.debug("mla-passes: running %s: %s", [p.name for p in self.passes], why)
        from torch._dynamo.utils import lazy_format_graph_code

        if not _in_dependency_order(graph):
            self.last_decision = f"{why}; but the graph has no dependency order (a cycle): left alone"
            return

        gm = graph.owning_module
        for p in self.passes:
            if gm is not None:
                logger.debug("%s", lazy_format_graph_code(f"mla_passes_before_{p.name}", gm))
            t0 = time.perf_counter()
            self.matched_counts[p.name] = p(graph)
            self.pass_ms[p.name] = (time.perf_counter() - t0) * 1e3
            logger.debug("%s: %d layer(s) rewritten in %.1f ms", p.name, self.matched_counts[p.name],
                         self.pass_ms[p.name])
            if gm is not None:
                logger.debug("%s", lazy_format_graph_code(f"mla_passes_after_{p.name}", gm))
        logger.debug("mla-passes: matched %s", self.matched_counts)

    def uuid(self) -> str:
        """Changes whenever the rewrite can change: config, threshold, compile
        range, pass and pattern sources, the matched op set, the registered
        layers' compile-time facts; stable otherwise."""
        modules = {sys.modules[__name__], sys.modules[PassConfig.__module__], sys.modules[DecodeGate.__module__],
                   _op_handles, sys.modules[pattern_modules.__module__]}
        for p in self.passes:
            modules.update(p.source_modules())
        modules.update(pattern_modules())
        state = {
            "config": self.config.as_dict(),
            "decode_max_tokens": self.decode_max_tokens,
            "range": None if (r := current_compile_range()) is None else (r.start, r.end),
            "passes": [p.name for p in self.passes],
            "ops": _op_handles.describe(),
            "layers": _layer_facts() if self.passes else [],
            "sources": sorted((m.__name__, _module_hash(m)) for m in modules),
        }
        return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def _layer_facts() -> list:
    """What the passes read from each locally registered layer at compile
    time (:func:`mla_passes.passes.attention.compile_time_facts`), by name. Layers
    resolved through vLLM are covered by vLLM's own compile-cache key (its
    config decides their cache dtype and q quantization)."""
    return sorted((name, compile_time_facts(state)) for name, state in local_layers.items())
