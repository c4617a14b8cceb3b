"""Started by the interpreter in vLLM test subprocesses whose PYTHONPATH has
this folder (main, engine-core and worker processes alike):

* ``MLA_TEST_CPU_ISA=avx2``: torch reports no AVX-512, AVX-512 bf16 or AMX
  support, so vLLM's CPU platform makes the choices it makes on an AVX2-only
  CPU (its ``_C_AVX2`` kernel build, the reference ``CPU_MLA`` backend and
  what follows from it). The AVX2 code runs on any x86-64 CPU of our kind, so
  every machine can test what an AVX2-only one runs. Nothing else reads
  these functions in the test processes.
* ``MLA_TEST_VLLM_COMPILE=1``: installs the VLLM_COMPILE-on-CPU harness (see
  ``tests/vllm_scripts/vllm_compile_on_cpu.py``).
"""
import os
import sys

if os.environ.get("MLA_TEST_CPU_ISA") == "avx2":
    import torch

    for _name in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_amx_tile_supported",
                  "_is_amx_fp16_supported"):
        if hasattr(torch.cpu, _name):
            setattr(torch.cpu, _name, lambda: False)
    del _name
elif os.environ.get("MLA_TEST_CPU_ISA"):
    raise SystemExit(f"MLA_TEST_CPU_ISA: expected 'avx2' or unset, got {os.environ['MLA_TEST_CPU_ISA']!r}")

if os.environ.get("MLA_TEST_VLLM_COMPILE") == "1":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import vllm_compile_on_cpu

    vllm_compile_on_cpu.install_when_imported()
