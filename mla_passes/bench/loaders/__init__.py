"""Loaders of the kernels the GPU checks compare against or run beside ours (AITER's Triton path,
FlashInfer's fused RoPE + quant + append, vLLM's Triton MLA decode attention), read from
``.whl/`` of a checkout (or the file an environment variable names) without installing those
projects; where a project is installed, from it. Leaves: they import nothing of mla-passes. ``python -m mla_passes.bench.loaders.<name>`` prepares ``.whl/``."""
