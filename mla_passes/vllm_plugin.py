"""The vLLM plugin: ``pass_config.fuse_aiter_qk_rope_kvcache_mla`` on stock vLLM.

vLLM calls :func:`register` (entry point group ``vllm.general_plugins``) once
per process: main, engine core and workers. It

1. adds our keys to vLLM's ``PassConfig`` (a pydantic dataclass with
   ``extra="forbid"`` in 0.32 and 0.33): ``fuse_aiter_qk_rope_kvcache_mla``,
   ``aiter_qk_rope_kvcache_fusion_max_token_num`` and
   ``aiter_qk_rope_kvcache_fusion_backend``. Any other unknown key is still
   rejected. At their defaults they leave ``PassConfig.compute_hash()`` as
   it is without the plugin;
2. hooks ``VllmConfig.__post_init__``: with the flag on it checks the vLLM
   layout, puts :class:`mla_passes.MLAPassManager` into
   ``compilation_config.inductor_compile_config["post_grad_custom_post_pass"]``
   (composed with a user's own pass there, which keeps running), adds the
   decode threshold to ``compile_ranges_endpoints`` and logs backend and
   threshold once. With the flag off it does nothing;
3. turns on vLLM's ``fuse_rope_kvcache_cat_mla`` (the rope/kv-cache
   prerequisite, DESIGN §4.4) when our flag is on, the user left it unset and
   the platform runs it (CUDA/ROCm), with a log line;
4. appends :class:`mla_passes.vllm_compat.VllmLayerResolver` to the layer
   resolver chain.

``LLM(compilation_config={"pass_config": {...}})`` builds vLLM's config
*before* vLLM loads general plugins, so step 1 also runs from
:func:`early_register`, an entry point in the ``vllm.platform_plugins`` group
(called while vLLM picks its platform, at import; it never claims a platform).
vLLM skips platform plugins when ``VLLM_TARGET_DEVICE=cpu``; then only the
CLI (which loads general plugins before parsing) and configs built after
``import mla_passes.vllm_plugin; register()`` know the keys.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.abc
import logging
import sys
from typing import Optional

from . import explain as _explain

logger = logging.getLogger("vllm.mla_passes")  # under vLLM's logger: shown with its handlers

FLAG = "fuse_aiter_qk_rope_kvcache_mla"
MAX_TOKENS = "aiter_qk_rope_kvcache_fusion_max_token_num"
BACKEND = "aiter_qk_rope_kvcache_fusion_backend"
ROPE_FLAG = "fuse_rope_kvcache_cat_mla"

# name -> (annotation, default): what vLLM's PassConfig gains.
PASS_CONFIG_FIELDS = {
    FLAG: (bool, False),
    MAX_TOKENS: (Optional[int], None),
    BACKEND: (str, "auto"),
}
PASS_KEY = "post_grad_custom_post_pass"


# --- 1. PassConfig keys ----------------------------------------------------------

def _add_field(cls, name, annotation, default) -> bool:
    if name in cls.__dataclass_fields__:
        return False
    f = dataclasses.field(default=default)
    f.name, f.type = name, annotation
    f._field_type = dataclasses._FIELD  # what dataclasses.fields() lists
    cls.__dataclass_fields__[name] = f
    cls.__annotations__[name] = annotation
    setattr(cls, name, default)
    return True


def _extend_module(compilation) -> None:
    """Add our fields to ``compilation.PassConfig`` and rebuild the pydantic
    validators of the configs that embed it. Idempotent."""
    from pydantic.dataclasses import rebuild_dataclass

    pass_config = compilation.PassConfig
    if getattr(pass_config, "_mla_passes_extended", False):
        return
    for name, (annotation, default) in PASS_CONFIG_FIELDS.items():
        _add_field(pass_config, name, annotation, default)
    _wrap_pass_config(pass_config)
    pass_config._mla_passes_extended = True
    rebuild_dataclass(pass_config, force=True)
    rebuild_dataclass(compilation.CompilationConfig, force=True)
    vllm_mod = sys.modules.get("vllm.config.vllm")
    if vllm_mod is not None and hasattr(vllm_mod, "VllmConfig"):
        rebuild_dataclass(vllm_mod.VllmConfig, force=True)


def extend_pass_config() -> None:
    import vllm.config.compilation as compilation

    _extend_module(compilation)


def _wrap_pass_config(cls) -> None:
    orig_post_init = cls.__post_init__

    @functools.wraps(orig_post_init)
    def __post_init__(self) -> None:
        # What the user asked for, before vLLM resolves None / turns it off on
        # platforms without its own rope/kv pass.
        object.__setattr__(self, "_mla_passes_rope_asked", getattr(self, ROPE_FLAG, None))
        if getattr(self, FLAG, False) and hasattr(type(self), ROPE_FLAG) and getattr(self, ROPE_FLAG) is None:
            from vllm.platforms import current_platform

            if current_platform.is_cuda_alike():
                setattr(self, ROPE_FLAG, True)
                logger.info("mla-passes: %s=True turns on %s=True (its rope/kv-cache prerequisite)", FLAG, ROPE_FLAG)
        orig_post_init(self)

    @functools.wraps(cls.compute_hash)
    def compute_hash(self) -> str:
        from vllm.config.utils import get_hash_factors, hash_factors

        # vLLM's own recipe (0.32/0.33), minus our keys while at their
        # defaults: flag off hashes exactly as without the plugin.
        at_default = {n for n, (_, d) in PASS_CONFIG_FIELDS.items() if getattr(self, n, d) == d}
        return hash_factors(get_hash_factors(self, at_default))

    cls.__post_init__ = __post_init__
    cls.compute_hash = compute_hash


class _ExtendWhenLoaded(importlib.abc.MetaPathFinder):
    """Extends PassConfig as soon as ``vllm.config.compilation`` has defined
    its classes: checked on every later import, then removed."""

    busy = False

    def find_spec(self, fullname, path=None, target=None):
        if _ExtendWhenLoaded.busy:
            return None
        mod = sys.modules.get("vllm.config.compilation")
        if mod is not None and hasattr(mod, "CompilationConfig") and hasattr(mod, "PassConfig"):
            _ExtendWhenLoaded.busy = True
            try:
                _extend_module(mod)
            except Exception:  # never break vLLM's import; register() retries
                logger.exception("mla-passes: could not extend vLLM's PassConfig early")
            finally:
                _ExtendWhenLoaded.busy = False
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
        return None


def early_register() -> None:
    """``vllm.platform_plugins`` hook: make our PassConfig keys known before
    any config is built. Returns None: it never activates a platform."""
    mod = sys.modules.get("vllm.config.compilation")
    if mod is not None and hasattr(mod, "CompilationConfig"):
        _extend_module(mod)
    elif not any(isinstance(f, _ExtendWhenLoaded) for f in sys.meta_path):
        sys.meta_path.insert(0, _ExtendWhenLoaded())
    return None


# --- 2. wiring the pass manager ----------------------------------------------------

def decode_threshold(max_num_seqs: int, num_speculative_tokens: int, override: int | None) -> int:
    """Largest token count the decode bucket holds (DESIGN §4.3)."""
    return override if override is not None else max_num_seqs * (1 + num_speculative_tokens)


def _uses_compile_ranges(vllm_config) -> bool:
    from vllm.config import CompilationMode

    return vllm_config.compilation_config.mode == CompilationMode.VLLM_COMPILE


def configure_vllm_config(vllm_config) -> None:
    """With the flag on: wire our pass manager into ``vllm_config`` (idempotent)."""
    cc = vllm_config.compilation_config
    pc = cc.pass_config
    if not getattr(pc, FLAG, False):
        _explain.note_vllm_config(vllm_config)  # "flag off", for mla-passes report
        return
    from . import vllm_compat
    from .config import PassConfig as MLAPassConfig
    from .kernels import resolve_backend
    from .pass_manager import MLAPassManager

    vllm_compat.check_supported()

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
    has_ranges = _uses_compile_ranges(vllm_config)
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
    if isinstance(existing, vllm_compat.ComposedPostGradPass):
        user_passes = existing.user_passes
    else:
        user_passes = [] if existing is None else [existing]
    cc.inductor_compile_config[PASS_KEY] = vllm_compat.ComposedPostGradPass([manager, *user_passes])

    threshold = decode_threshold(max_num_seqs, num_spec, override)
    endpoints = list(cc.compile_ranges_endpoints or [])
    if threshold not in endpoints:
        cc.compile_ranges_endpoints = sorted([*endpoints, threshold])

    device = getattr(vllm_config.device_config, "device", None) or "cpu"
    used = resolve_backend(asked, device)  # warns once on a fallback
    _log_once(used, asked, threshold if has_ranges else None, max_num_seqs, num_spec, len(user_passes))


@functools.lru_cache(maxsize=None)
def _log_once(used, asked, threshold, max_num_seqs, num_spec, n_user) -> None:
    logger.info(
        "mla-passes: MLA decode fusion on: backend %s (asked %s), decode threshold %s "
        "(max_num_seqs %d x (1 + %d speculative))%s",
        used, asked, f"{threshold} tokens" if threshold is not None
        else "n/a: no compile ranges here, the one graph is rewritten", max_num_seqs, num_spec,
        f", after which {n_user} user post-grad pass(es) run" if n_user else "",
    )


def _wrap_vllm_config() -> None:
    from vllm.config.vllm import VllmConfig

    if getattr(VllmConfig, "_mla_passes_wrapped", False):
        return
    orig = VllmConfig.__post_init__

    @functools.wraps(orig)
    def __post_init__(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        configure_vllm_config(self)

    VllmConfig.__post_init__ = __post_init__
    VllmConfig._mla_passes_wrapped = True


# --- entry point ------------------------------------------------------------------

def register() -> None:
    """``vllm.general_plugins`` entry point (once per vLLM process)."""
    extend_pass_config()
    _wrap_vllm_config()
    from . import layers, vllm_compat

    layers.add_resolver(vllm_compat.VllmLayerResolver())


__all__ = ["PASS_CONFIG_FIELDS", "configure_vllm_config", "decode_threshold", "early_register", "register"]
