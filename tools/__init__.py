"""Scripts for a checkout of mla-passes, not installed: the GPU-machine loaders
(``aiter_stub``, ``flashinfer_stub``, ``vllm_mla_stub``), the GPU checks
(``gpu_check.sh``, ``gpu_vllm``), one-off sweeps and the import graph. Run from
the repository root as ``python -m tools.<name>``."""
