"""Started by the interpreter in vLLM test subprocesses whose PYTHONPATH has
this folder: installs the VLLM_COMPILE-on-CPU harness (see
``tests/vllm_scripts/vllm_compile_on_cpu.py``) when ``MLA_TEST_VLLM_COMPILE=1``."""
import os
import sys

if os.environ.get("MLA_TEST_VLLM_COMPILE") == "1":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import vllm_compile_on_cpu

    vllm_compile_on_cpu.install_when_imported()
