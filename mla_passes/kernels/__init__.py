"""Kernel entry points for the fused MLA decode prep (DESIGN §4.1).

One signature for every backend (the arguments: :mod:`.signature`); the
backends, their availability and their fallbacks: the table in
:mod:`.backends` (reference, triton, aiter; ``"auto"`` picks the best one
available for the tensors' device).

A backend that is asked for but cannot run here falls back to the next one
(aiter -> triton -> reference) with a single warning per (asked, used) pair.
"""

from __future__ import annotations

import functools
import logging

import torch

from .backends import AUTO_ORDER, BACKENDS, BY_NAME, CHOICES, first_available, implementation
from .fp8 import is_fp8_kv_cache, platform_fp8_dtype
from .reference import gather_cache_rows_reference
from .validate import check_fused_decode_prep_args, check_index_ranges, check_kv_cache, index_checks_requested

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(asked: str, used: str, device: str) -> None:
    logger.warning("mla-passes: backend %r is not available on %s; using %r instead", asked, device, used)


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The backend that will run for ``backend`` on ``device``."""
    device = torch.device(device)
    if backend == "auto":
        for name in AUTO_ORDER:
            if BY_NAME[name].available(device):
                return name
    if backend not in BACKENDS:
        raise ValueError(f"fused_decode_prep: argument 'backend' must be one of {CHOICES}, got {backend!r}")
    used = first_available(backend, device)
    if used != backend:
        _warn_fallback_once(backend, used, str(device))
    return used


def fused_decode_prep(
    q: torch.Tensor,
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    w_uk_t: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    slot_mapping: torch.Tensor,
    kv_cache: torch.Tensor,
    kv_cache_dtype: str,
    k_scale: torch.Tensor,
    q_scale: torch.Tensor | None,
    q_out: torch.Tensor,
    *,
    backend: str = "auto",
) -> None:
    """RoPE + KV-cache write + q-absorb + q-concat + q-quant in one call.

    The arguments (shapes, dtypes, meaning): :mod:`mla_passes.kernels.signature`.

    ``q_out[t, h] = quant([q[t, h, :P] @ w_uk_t[h] | rope(q[t, h, P:])], q_scale)``
    for every row t; cache row ``slot_mapping[t]`` gets
    ``quant([kv_c[t] | rope(k_pe[t])], k_scale)`` where the slot is >= 0;
    ``q[..., P:]`` and ``k_pe`` are rotated in place. See DESIGN §4.1.

    Index values out of range (positions outside ``cos_sin_cache``, slots past
    the cache): the reference backend raises a ValueError naming the argument;
    the Triton kernel never reads or writes outside the tensors, gives such a
    token NaN rotary values (bad position) or no cache row (bad slot). Set
    ``MLA_PASSES_CHECK_INDICES=1`` to have every backend check the values
    before it runs (a device sync; skipped during CUDA-graph capture).
    NaN inputs come out as NaN in every backend (fp8 has a NaN code).
    """
    dims = check_fused_decode_prep_args(
        q, kv_c, k_pe, w_uk_t, positions, cos_sin_cache, is_neox, slot_mapping,
        kv_cache, kv_cache_dtype, k_scale, q_scale, q_out,
    )
    if index_checks_requested():
        check_index_ranges(positions, slot_mapping, cos_sin_cache.shape[0], dims.num_blocks * dims.block_size)
    impl = implementation(resolve_backend(backend, q.device))
    impl(q, kv_c, k_pe, w_uk_t, positions, cos_sin_cache, is_neox, slot_mapping,
         kv_cache, kv_cache_dtype, k_scale, q_scale, q_out, dims)


def gather_cache_rows(
    kv_cache: torch.Tensor,
    slots: torch.Tensor,
    kv_cache_dtype: str,
    k_scale: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Read back cache rows ``slots`` as ``[N, L+R]`` in ``dtype``.

    fp8 rows are dequantized (``x * k_scale``); rows of ``slots < 0`` are zeros.
    The output shape depends on ``slots.shape`` only and nothing syncs with the
    host, so this is safe to capture in a CUDA graph. ``dtype`` defaults to the
    cache dtype for ``"auto"`` caches and bfloat16 for fp8 caches.
    """
    check_kv_cache(kv_cache, kv_cache_dtype, fn="gather_cache_rows")
    if slots.dim() != 1 or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"gather_cache_rows: argument 'slots' must be 1-D int32/int64, got shape {tuple(slots.shape)} dtype {slots.dtype}")
    if k_scale is None or k_scale.numel() != 1:
        raise ValueError("gather_cache_rows: argument 'k_scale' must be a tensor of one element")
    if dtype is None:
        dtype = torch.bfloat16 if is_fp8_kv_cache(kv_cache_dtype) else kv_cache.dtype
    if slots.numel() > 0 and BY_NAME["triton"].available(kv_cache.device):
        # one launch, no host sync (the reference's index_select/where are several)
        from . import triton_prep  # imports triton: only where the triton backend is available

        return triton_prep.gather_cache_rows_triton(kv_cache, slots, kv_cache_dtype, k_scale, dtype)
    return gather_cache_rows_reference(kv_cache, slots, kv_cache_dtype, k_scale, dtype)


__all__ = [
    "BACKENDS",
    "fused_decode_prep",
    "gather_cache_rows",
    "platform_fp8_dtype",
    "resolve_backend",
]
