"""Kernel entry points for the fused MLA decode prep (DESIGN §4.1).

One signature for every backend:

* ``"reference"`` - torch ops, any device (:mod:`.reference`);
* ``"triton"``    - one Triton kernel, CUDA and ROCm (:mod:`.triton_prep`);
* ``"aiter"``     - AITER's HIP kernel on ROCm (:mod:`.aiter_prep`);
* ``"auto"``      - the best one available for the tensors' device.

A backend that is asked for but cannot run here falls back to the next one
(aiter -> triton -> reference) with a single warning per (asked, used) pair.
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Callable

import torch

from .fp8 import is_fp8_kv_cache, platform_fp8_dtype
from .reference import fused_decode_prep_reference, gather_cache_rows_reference
from .validate import check_fused_decode_prep_args, check_index_ranges, check_kv_cache, index_checks_requested

logger = logging.getLogger(__name__)

BACKENDS = ("reference", "triton", "aiter")
_FALLBACK = {"aiter": "triton", "triton": "reference"}


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _triton_available(device: torch.device) -> bool:
    """Our Triton kernels run on CUDA and ROCm devices where triton imports."""
    return device.type == "cuda" and _triton_importable()


def _aiter_available(device: torch.device) -> bool:
    if device.type != "cuda" or torch.version.hip is None:
        return False
    return importlib.util.find_spec("aiter") is not None


_AVAILABLE: dict[str, Callable[[torch.device], bool]] = {
    "reference": lambda device: True,
    "triton": _triton_available,
    "aiter": _aiter_available,
}


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(asked: str, used: str, device: str) -> None:
    logger.warning("mla-passes: backend %r is not available on %s; using %r instead", asked, device, used)


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The backend that will run for ``backend`` on ``device``."""
    device = torch.device(device)
    if backend == "auto":
        for name in ("aiter", "triton", "reference"):
            if _AVAILABLE[name](device):
                return name
    if backend not in BACKENDS:
        raise ValueError(f"fused_decode_prep: argument 'backend' must be one of {('auto',) + BACKENDS}, got {backend!r}")
    used = backend
    while not _AVAILABLE[used](device):
        used = _FALLBACK[used]
    if used != backend:
        _warn_fallback_once(backend, used, str(device))
    return used


def _impl(name: str) -> Callable:
    if name == "reference":
        return fused_decode_prep_reference
    if name == "triton":
        return importlib.import_module(".triton_prep", __name__).fused_decode_prep_triton
    return importlib.import_module(".aiter_prep", __name__).fused_decode_prep_aiter


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
    impl = _impl(resolve_backend(backend, q.device))
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
    if slots.numel() > 0 and _triton_available(kv_cache.device):
        # one launch, no host sync (the reference's index_select/where are several)
        triton_prep = importlib.import_module(".triton_prep", __name__)
        return triton_prep.gather_cache_rows_triton(kv_cache, slots, kv_cache_dtype, k_scale, dtype)
    return gather_cache_rows_reference(kv_cache, slots, kv_cache_dtype, k_scale, dtype)


__all__ = [
    "BACKENDS",
    "fused_decode_prep",
    "gather_cache_rows",
    "platform_fp8_dtype",
    "resolve_backend",
]
