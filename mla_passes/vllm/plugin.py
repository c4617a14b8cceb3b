"""The vLLM plugin: ``pass_config.fuse_aiter_qk_rope_kvcache_mla`` on stock vLLM.

vLLM calls :func:`register` (entry point group ``vllm.general_plugins``) once
per process: main, engine core and workers. It

1. adds our keys to vLLM's ``PassConfig`` (a pydantic dataclass with
   ``extra="forbid"`` in 0.32 to 0.34): ``fuse_aiter_qk_rope_kvcache_mla``,
   ``aiter_qk_rope_kvcache_fusion_max_token_num`` and
   ``aiter_qk_rope_kvcache_fusion_backend``. Any other unknown key is still
   rejected. At their defaults they leave ``PassConfig``'s hash (0.34:
   ``compile_factors()``) as it is without the plugin;
2. in ``VLLM_COMPILE`` mode (vLLM on GPU) with the flag on, turns on
   ``compilation_config.use_inductor_graph_partition`` unless the user set
   it, before vLLM computes ``splitting_ops`` from it: with partition off
   vLLM splits the FX graph at ``vllm::unified_mla_attention_with_output`` and
   ``vllm::unified_mla_kv_cache_update`` and no layer reaches our pass whole.
   vLLM then lists its attention ops for Inductor's partitioner, and we add
   ``mla_passes::mla_attention_with_prepped_q`` beside them (it replaces
   vLLM's MLA attention, so it stays outside piecewise CUDA graphs as that
   one does). Both fields are hashed by ``CompilationConfig.compute_hash``,
   so the compile cache tells the two setups apart. A user who forced
   partition off (with an MLA op still splitting the graph) gets one warning
   naming the flag, and our pass is not installed: the graph stays vLLM's;
3. hooks ``VllmConfig.__post_init__``: with the flag on it checks the vLLM
   layout, puts :class:`mla_passes.MLAPassManager` into
   ``compilation_config.inductor_compile_config["post_grad_custom_post_pass"]``
   (composed with a user's own pass there, which keeps running), adds the
   decode threshold to ``compile_ranges_endpoints`` (below the token budget
   only, :func:`add_decode_endpoint`) and logs backend,
   threshold and partition state once. With the flag off it does nothing;
   it also turns on vLLM's ``fuse_rope_kvcache_cat_mla`` (the rope/kv-cache
   prerequisite, DESIGN §4.4) when our flag is on, the user left it unset and
   the platform runs it (CUDA/ROCm), with a log line;
4. appends :class:`mla_passes.vllm.compat.VllmLayerResolver` to the layer
   resolver chain.

How each vLLM class is changed lives in :mod:`mla_passes.vllm.patches`; the
ops and versions it knows, in :mod:`mla_passes.vllm.tables`.
Log lines come from the ``mla_passes`` logger tree, which :func:`register`
hands vLLM's log handlers.

``LLM(compilation_config={"pass_config": {...}})`` builds vLLM's config
*before* vLLM loads general plugins, so step 1 also runs from
:func:`early_register`, an entry point in the ``vllm.platform_plugins`` group
(called while vLLM picks its platform, at import; it never claims a platform).
vLLM skips platform plugins when ``VLLM_TARGET_DEVICE=cpu``; then only the
CLI (which loads general plugins before parsing) and configs built after
``import mla_passes.vllm.plugin; register()`` know the keys.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

from .. import records as _explain
from .. import layers
from ..config import PassConfig as MLAPassConfig
from ..kernels import resolve_backend
from ..pass_manager import MLAPassManager
from . import patches, tables

# .compat is imported inside the hooks below, never here: it imports vLLM's
# compilation and MLA attention modules, and vLLM imports this module (for
# early_register) while vLLM itself is still being imported.

logger = logging.getLogger(__name__)  # the mla_passes tree; shown through vLLM's handlers (register())

FLAG = "fuse_aiter_qk_rope_kvcache_mla"
MAX_TOKENS = "aiter_qk_rope_kvcache_fusion_max_token_num"
BACKEND = "aiter_qk_rope_kvcache_fusion_backend"
ROPE_FLAG = "fuse_rope_kvcache_cat_mla"
PARTITION_FLAG = "use_inductor_graph_partition"

# name -> (annotation, default): what vLLM's PassConfig gains.
PASS_CONFIG_FIELDS = {
    FLAG: (bool, False),
    MAX_TOKENS: (Optional[int], None),
    BACKEND: (str, "auto"),
}
PASS_KEY = "post_grad_custom_post_pass"

# Ops by their splitting_ops names.
PREPPED_ATTENTION_OP = "mla_passes::mla_attention_with_prepped_q"
VLLM_MLA_ATTENTION_OPS = tables.qualified_names("attention")
VLLM_MLA_OPS = VLLM_MLA_ATTENTION_OPS + tables.qualified_names("kv_cache_update")


# --- 1. PassConfig keys ----------------------------------------------------------

def _before_pass_config_init(pc) -> None:
    # What the user asked for, before vLLM resolves None / turns it off on
    # platforms without its own rope/kv pass.
    object.__setattr__(pc, "_mla_passes_rope_asked", getattr(pc, ROPE_FLAG, None))
    if getattr(pc, FLAG, False) and hasattr(type(pc), ROPE_FLAG) and getattr(pc, ROPE_FLAG) is None:
        from vllm.platforms import current_platform

        if current_platform.is_cuda_alike():
            setattr(pc, ROPE_FLAG, True)
            logger.info("mla-passes: %s=True turns on %s=True (its rope/kv-cache prerequisite)", FLAG, ROPE_FLAG)


def _hash_ignored(pc) -> set[str]:
    """Our keys while at their defaults: flag off hashes exactly as without the plugin."""
    return {n for n, (_, d) in PASS_CONFIG_FIELDS.items() if getattr(pc, n, d) == d}


def _extend_module(compilation) -> None:
    """Add our fields to ``compilation.PassConfig`` (idempotent)."""
    patches.add_pass_config_fields(compilation, PASS_CONFIG_FIELDS)
    patches.wrap_pass_config(compilation.PassConfig, _before_pass_config_init, _hash_ignored)


def extend_pass_config() -> None:
    import vllm.config.compilation as compilation

    _extend_module(compilation)


def early_register() -> None:
    """``vllm.platform_plugins`` hook: make our PassConfig keys known before
    any config is built. Returns None: it never activates a platform."""
    patches.when_compilation_loaded(_extend_module)
    return None


# --- 2. graph partition and splitting ops (VLLM_COMPILE) ---------------------------

def _flag_on(cc) -> bool:
    return bool(getattr(cc.pass_config, FLAG, False))


def _is_vllm_compile(cc) -> bool:
    from vllm.config import CompilationMode

    return cc.mode == CompilationMode.VLLM_COMPILE


def _before_vllm_config(vllm_config) -> None:
    """Before vLLM fills defaults: remember whether the user set graph partition."""
    cc = vllm_config.compilation_config
    if not hasattr(cc, "_mla_passes_partition_asked"):
        object.__setattr__(cc, "_mla_passes_partition_asked", getattr(cc, PARTITION_FLAG, None))


def _before_splitting_ops(cc) -> None:
    """vLLM is about to compute ``splitting_ops`` (the mode is final here).

    In ``VLLM_COMPILE`` mode with the flag on, turn on Inductor graph partition
    unless the user set it: with it off, vLLM splits the FX graph at both MLA
    ops and no layer reaches our pass whole. vLLM then computes
    ``splitting_ops`` for partition mode itself (no kv-cache-update split)."""
    if not (_flag_on(cc) and _is_vllm_compile(cc)):
        return
    asked = getattr(cc, "_mla_passes_partition_asked", None)
    if asked is None and not getattr(cc, PARTITION_FLAG):
        from vllm.utils.torch_utils import is_torch_equal_or_newer

        if is_torch_equal_or_newer("2.9.0.dev"):
            setattr(cc, PARTITION_FLAG, True)


def _after_splitting_ops(cc) -> None:
    """Our prepped-q attention replaces vLLM's MLA attention, so it is a
    partition point wherever vLLM's is (Inductor's ``custom_should_partition_ops``
    gets ``splitting_ops``): it runs outside piecewise CUDA graphs, with this
    step's metadata, as vLLM's attention does."""
    if not (_flag_on(cc) and _is_vllm_compile(cc) and getattr(cc, PARTITION_FLAG, False)):
        return
    ops = cc.splitting_ops
    if ops is not None and any(op in ops for op in VLLM_MLA_ATTENTION_OPS) and PREPPED_ATTENTION_OP not in ops:
        ops.append(PREPPED_ATTENTION_OP)


def partition_state(cc) -> tuple[bool, str]:
    """(can our passes see whole layers, why) for a finished compilation config."""
    if not _is_vllm_compile(cc):
        return True, f"compilation mode {getattr(cc.mode, 'name', cc.mode)}: one graph, no FX split"
    listed = getattr(cc, "splitting_ops", None) or []
    if getattr(cc, PARTITION_FLAG, False):
        points = [op for op in (*VLLM_MLA_ATTENTION_OPS, PREPPED_ATTENTION_OP) if op in listed]
        return True, f"Inductor graph partition on (no FX split; partitions at {', '.join(points) or 'no MLA op'})"
    splits = [op for op in VLLM_MLA_OPS if op in listed]
    if splits:
        return False, f"{PARTITION_FLAG}=False and the FX graph splits at {', '.join(splits)}"
    return True, f"{PARTITION_FLAG}=False, no MLA op in splitting_ops (the FX graph keeps whole layers)"


@functools.lru_cache(maxsize=None)
def _warn_partition_off(why: str) -> None:
    logger.warning(
        "mla-passes: %s=True is set but the MLA decode fusion cannot apply: %s. "
        "Leave compilation_config.%s unset (or set it to True) to enable it; the graph is left as vLLM builds it.",
        FLAG, why, PARTITION_FLAG)


# --- 3. wiring the pass manager ----------------------------------------------------

def configure_vllm_config(vllm_config) -> None:
    """With the flag on: wire our pass manager into ``vllm_config`` (idempotent)."""
    cc = vllm_config.compilation_config
    pc = cc.pass_config
    if not getattr(pc, FLAG, False):
        _explain.note_vllm_config(vllm_config)  # "flag off", for mla-passes report
        return
    from . import compat  # not at the top (see the imports), and only with the flag on

    compat.check_supported()

    whole, partition = partition_state(cc)
    if not whole:
        _warn_partition_off(partition)
        return

    max_num_seqs = vllm_config.scheduler_config.max_num_seqs
    spec = vllm_config.speculative_config
    num_spec = int(getattr(spec, "num_speculative_tokens", 0) or 0) if spec is not None else 0
    override = getattr(pc, MAX_TOKENS, None)
    asked = getattr(pc, BACKEND, "auto")
    # vLLM's own flag as the user gave it: an explicit False keeps our fusion
    # off raw-RoPE layers; unset lets our config turn the prerequisite on.
    rope_asked = getattr(pc, "_mla_passes_rope_asked", None)
    # Without compile ranges (vLLM on CPU: one plain-Inductor graph for every
    # batch size) the passes apply to that graph; the prepped-q attention
    # routes its prefill rows through vLLM's own path.
    has_ranges = _is_vllm_compile(cc)
    config = MLAPassConfig(
        fuse_aiter_qk_rope_kvcache_mla=True,
        fuse_rope_kvcache_cat_mla=rope_asked,
        aiter_qk_rope_kvcache_fusion_max_token_num=override,
        backend=asked,
        no_range_policy="infer" if has_ranges else "apply",
    )
    manager = MLAPassManager(config, max_num_seqs=max_num_seqs, num_speculative_tokens=num_spec)
    _explain.note_vllm_config(vllm_config, manager)  # records (+ graphs on CPU) into debug_dump_path

    existing = cc.inductor_compile_config.get(PASS_KEY)
    if isinstance(existing, compat.ComposedPostGradPass):
        user_passes = existing.user_passes
    else:
        user_passes = [] if existing is None else [existing]
    cc.inductor_compile_config[PASS_KEY] = compat.ComposedPostGradPass([manager, *user_passes])

    threshold = config.decode_max_tokens(max_num_seqs, num_spec)  # the rule lives in gating.py
    add_decode_endpoint(cc, threshold, getattr(vllm_config.scheduler_config, "max_num_batched_tokens", None))

    device = getattr(vllm_config.device_config, "device", None) or "cpu"
    used = resolve_backend(asked, device)  # warns once on a fallback
    _log_once(used, asked, threshold if has_ranges else None, max_num_seqs, num_spec, len(user_passes), partition)


def add_decode_endpoint(cc, threshold: int | None, token_budget: int | None) -> None:
    """Give the decode bucket its own compile range: ``threshold`` joins
    ``cc.compile_ranges_endpoints`` when it falls below the token budget
    (``max_num_batched_tokens``, vLLM's last endpoint). vLLM has already
    dropped its own endpoints at or above the budget (``_set_compile_ranges``);
    ours runs after that, so it keeps the same rule: a threshold at or above
    the budget (``max_num_seqs * (1 + num_speculative_tokens)`` can be, with
    speculative decoding) would add a range of batches the scheduler never
    forms. Every range then ends within the bucket, and the passes apply to all."""
    if threshold is None or (token_budget is not None and threshold >= token_budget):
        return
    endpoints = list(cc.compile_ranges_endpoints or [])
    if threshold not in endpoints:
        cc.compile_ranges_endpoints = sorted([*endpoints, threshold])


@functools.lru_cache(maxsize=None)
def _log_once(used, asked, threshold, max_num_seqs, num_spec, n_user, partition) -> None:
    logger.info(
        "mla-passes: MLA decode fusion on: backend %s (asked %s), decode threshold %s "
        "(max_num_seqs %d x (1 + %d speculative)); %s%s",
        used, asked, f"{threshold} tokens" if threshold is not None
        else "n/a: no compile ranges here, the one graph is rewritten", max_num_seqs, num_spec, partition,
        f"; after which {n_user} user post-grad pass(es) run" if n_user else "",
    )


# --- entry point ------------------------------------------------------------------

def register() -> None:
    """``vllm.general_plugins`` entry point (once per vLLM process)."""
    patches.share_vllm_log_handlers()
    extend_pass_config()
    patches.wrap_vllm_config(_before_vllm_config, configure_vllm_config)
    patches.wrap_set_splitting_ops(_before_splitting_ops, _after_splitting_ops)
    from . import compat  # not at the top (see the imports)

    layers.add_resolver(compat.VllmLayerResolver())


__all__ = ["PASS_CONFIG_FIELDS", "configure_vllm_config", "early_register",
           "partition_state", "register"]
