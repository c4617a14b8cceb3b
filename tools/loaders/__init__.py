"""Loaders of the kernels the GPU checks compare against or run beside ours (AITER's Triton path,
FlashInfer's fused RoPE + quant + append, vLLM's Triton MLA decode attention), read from
``.whl/`` of this checkout without installing those projects. Leaves: they import nothing of
mla-passes. ``python -m tools.loaders.<name>`` prepares ``.whl/``."""
