"""The AITER backend of the fused MLA decode prep (ROCm; DESIGN §4.1, §5).

The q-absorb runs as a torch bmm; RoPE, concat, q-quant and the cache write run
in AITER's HIP op ``aiter.fused_qk_rope_concat_and_cache_mla``. That op reads
its arguments in its own way and checks little, so every argument is
converted here to what it reads (DESIGN §5):

* ``slot_mapping`` and ``positions`` as int64 (int32 is misread silently);
* ``cos`` and ``sin`` split out of ``cos_sin_cache``, in the dtype of q,
  contiguous ``[max_pos, R/2]`` (fp32 tables with a bf16 q are misread);
* a uint8 fp8 cache viewed (no copy) as the platform fp8 dtype
  (e4m3fnuz on gfx94x, e4m3fn on gfx950); the other flavour is rejected;
* the block-size-1 view ``kv_cache.view(-1, 1, L+R)`` where the strides allow
  it (the op's fastest decode kernel wants block size 1);
* ``k_pe`` as a 2-D ``[T, R]`` view (a 2-D ``kv_c`` with a 3-D ``k_pe`` is
  rejected);
* ``compute_all_q_rope=True`` so the q_out rows of slot < 0 (padding) tokens
  are written too; an AITER without that argument, or a shape its all-rows
  kernels do not cover, gets those rows written here afterwards.

The op leaves ``q_pe`` and ``k_pe`` as they were, so they are rotated in place
here after it ran. It has no fp8-q-with-bf16-cache combination and no other
fp8 flavour for q; those go through an unquantized q_out and a torch quant.
Configurations it cannot take at all (a cache of the non-platform fp8
flavour, non-unit innermost strides) run on the next backend, with one warning.

``aiter`` is imported only when this backend runs.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from .backends import BY_NAME, first_available, implementation
from .fp8 import is_fp8_kv_cache, platform_fp8_dtype, quantize_fp8
from .reference import absorb_q_nope, cos_sin_for, rope_fp32

logger = logging.getLogger(__name__)

# AITER's all-rows q kernels (per-head and "opt") exist for these dims only.
_ALL_ROWS_L, _ALL_ROWS_R = 512, 64


def _aiter():
    return importlib.import_module("aiter")


@functools.lru_cache(maxsize=None)
def _accepts_compute_all_q_rope(fn) -> bool:
    try:
        return "compute_all_q_rope" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        pass
    try:  # a torch custom op: read its schema
        return "compute_all_q_rope" in str(torch.ops.aiter.fused_qk_rope_concat_and_cache_mla.default._schema)
    except (AttributeError, RuntimeError):
        return False


# ----------------------------------------------------------------- conversions
# One function per contract point, so each can be tested (and broken on purpose).


def index64(t: torch.Tensor) -> torch.Tensor:
    """slot_mapping / positions: AITER reads int64."""
    return t if t.dtype == torch.int64 else t.long()


# weak reference to the table's storage (hashes as that storage) -> (view key, (cos, sin))
_COS_SIN: dict = {}


def split_cos_sin(cos_sin_cache: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin as contiguous ``[max_pos, R/2]`` tensors of the model dtype.

    The table is a per-model constant; the split is kept so steady-state calls
    and CUDA-graph replays do no conversion work. An entry belongs to the
    table's STORAGE (held by a weak reference; a freed storage's entry is never
    used again, even when new memory lands at the same address) and is valid
    for the view (offset, shape, strides), the version counter (an in-place
    update of the table invalidates it) and the dtypes.
    """
    ref = StorageWeakRef(cos_sin_cache.untyped_storage())
    key = (cos_sin_cache.storage_offset(), tuple(cos_sin_cache.shape), cos_sin_cache.stride(),
           cos_sin_cache._version, cos_sin_cache.dtype, cos_sin_cache.device, dtype)
    hit = _COS_SIN.get(ref)
    if hit is not None and hit[0] == key:
        return hit[1]
    half = cos_sin_cache.shape[1] // 2
    out = (cos_sin_cache[:, :half].to(dtype).contiguous(), cos_sin_cache[:, half:].to(dtype).contiguous())
    if len(_COS_SIN) >= 16:
        _COS_SIN.clear()
    _COS_SIN[ref] = (key, out)
    return out


def cache_view(kv_cache: torch.Tensor, kv_cache_dtype: str) -> torch.Tensor | None:
    """The cache as AITER takes it, or None where it cannot take it.

    fp8: a uint8 cache is viewed as the platform fp8 dtype; an fp8 cache of
    the other flavour is not supported. Then the block-size-1 view where the
    first two dims merge.
    """
    cache = kv_cache
    if is_fp8_kv_cache(kv_cache_dtype):
        fp8 = platform_fp8_dtype(kv_cache.device)
        if cache.dtype == torch.uint8:
            cache = cache.view(fp8)
        elif cache.dtype != fp8:
            return None
    if cache.stride(2) != 1:
        return None
    if cache.shape[1] != 1 and cache.stride(0) == cache.shape[1] * cache.stride(1):
        cache = cache.view(-1, 1, cache.shape[2])
    return cache


def k_pe_2d(k_pe: torch.Tensor) -> torch.Tensor:
    """``[T, 1, R]`` -> ``[T, R]`` (a view): AITER's decode path wants kv_c and k_pe both 2-D."""
    return k_pe.select(1, 0) if k_pe.dim() == 3 else k_pe


def write_pad_rows(q_dst: torch.Tensor, pad_rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """q rows of slot < 0 tokens, which AITER without compute_all_q_rope skips
    (no host sync: a select over every row)."""
    q_dst.copy_(torch.where((slot_mapping < 0)[:, None, None], pad_rows, q_dst))


# ---------------------------------------------------------------------- backend


@functools.lru_cache(maxsize=None)
def _warn_unsupported_once(reason: str, used: str) -> None:
    logger.warning("mla-passes: the AITER op cannot take this call (%s); using %r", reason, used)


def _next_backend(device: torch.device):
    """(impl, name) of the backend after AITER on ``device``: the first
    available one down AITER's fallback chain (DESIGN §4.4, :mod:`.backends`)."""
    used = first_available(BY_NAME["aiter"].fallback, device)
    return implementation(used), used


def _unsupported_reason(q, kv_c, k_pe, q_out, cache) -> str | None:
    if cache is None:
        return "kv_cache is neither the platform fp8 flavour nor unit-strided in its last dim"
    for name, t in (("q", q), ("kv_c", kv_c), ("k_pe", k_pe), ("q_out", q_out)):
        if t.stride(-1) != 1:
            return f"{name} has a non-unit innermost stride"
    return None


def fused_decode_prep_aiter(
    q, kv_c, k_pe, w_uk_t, positions, cos_sin_cache, is_neox, slot_mapping,
    kv_cache, kv_cache_dtype, k_scale, q_scale, q_out, dims,
) -> None:
    """The AITER backend of :func:`mla_passes.kernels.fused_decode_prep`
    (arguments: :mod:`.signature`, then ``dims``)."""
    T, H, P, L, R = dims.T, dims.H, dims.P, dims.L, dims.R
    if T == 0:
        return
    cache = cache_view(kv_cache, kv_cache_dtype)
    reason = _unsupported_reason(q, kv_c, k_pe, q_out, cache)
    if reason is not None:
        impl, used = _next_backend(q.device)
        _warn_unsupported_once(reason, used)
        impl(q, kv_c, k_pe, w_uk_t, positions, cos_sin_cache, is_neox, slot_mapping,
             kv_cache, kv_cache_dtype, k_scale, q_scale, q_out, dims)
        return

    aiter = _aiter()
    op = aiter.fused_qk_rope_concat_and_cache_mla
    q_nope, q_pe = q[..., :P], q[..., P:]
    k_pe2 = k_pe_2d(k_pe)
    w = w_uk_t if w_uk_t.dtype == q.dtype else w_uk_t.to(q.dtype)
    # [H, T, P] x [H, P, L] -> [H, T, L], fp32 accumulate; AITER reads it through strides
    ql_nope = torch.bmm(q_nope.transpose(0, 1), w).transpose(0, 1)
    slots64, pos64 = index64(slot_mapping), index64(positions)
    cos, sin = split_cos_sin(cos_sin_cache, q.dtype)

    # q_out as AITER can write it: fp8 q only of the platform flavour and with
    # an fp8 cache; otherwise an unquantized q_out, quantized here.
    fp8_cache = is_fp8_kv_cache(kv_cache_dtype)
    direct_q = q_scale is None or (fp8_cache and q_out.dtype == platform_fp8_dtype(q.device))
    q_dst = q_out if direct_q else torch.empty(q_out.shape, dtype=q.dtype, device=q.device)
    # An unquantized q ignores q_scale, but the op dereferences it: any fp32 [1].
    q_scale_arg = q_scale if q_scale is not None else k_scale

    all_rows = (
        _accepts_compute_all_q_rope(op)
        and L == _ALL_ROWS_L and R == _ALL_ROWS_R
        and (L * H >= 2048 or (cache.shape[1] == 1 and T < 256))
    )
    if not all_rows:
        # Rows of slot < 0 tokens: computed here from the unrotated inputs
        # (before the in-place rotation below), merged after the op.
        c32, s32 = cos_sin_for(cos_sin_cache, positions)
        pad_rows = torch.cat((absorb_q_nope(q_nope, w_uk_t),
                              rope_fp32(q_pe, c32[:, None, :], s32[:, None, :], is_neox)), dim=-1)
        if q_dst.dtype == q.dtype:
            pad_rows = pad_rows.to(q.dtype)
        else:
            pad_rows = quantize_fp8(pad_rows, q_scale, q_dst.dtype)

    kwargs = {"compute_all_q_rope": True} if all_rows else {}
    op(ql_nope, q_pe, kv_c, k_pe2, cache, q_dst, slots64, k_scale, q_scale_arg, pos64,
       cos, sin, bool(is_neox), True, **kwargs)

    if not all_rows:
        write_pad_rows(q_dst, pad_rows, slot_mapping)
    if q_dst is not q_out:
        if q_scale is not None:
            q_out.copy_(quantize_fp8(q_dst, q_scale, q_out.dtype))
        else:
            q_out.copy_(q_dst)

    # The op reads q_pe / k_pe and leaves them; the contract rotates them in place.
    c32, s32 = cos_sin_for(cos_sin_cache, positions)
    q_pe.copy_(rope_fp32(q_pe, c32[:, None, :], s32[:, None, :], is_neox))
    k_pe2.copy_(rope_fp32(k_pe2, c32, s32, is_neox))
