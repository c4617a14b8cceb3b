"""Argument checks for :func:`mla_passes.kernels.fused_decode_prep`.

Every backend runs these before touching memory, so a bad call fails with an
error that names the argument and what was expected instead of a garbage
result or a device fault. The checks read shapes and dtypes only (no device
sync), so they are safe under CUDA-graph capture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fp8 import FP8_DTYPES, KV_CACHE_DTYPES, is_fp8_kv_cache

_INT_DTYPES = (torch.int32, torch.int64)
_MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class PrepDims:
    """Sizes of one decode-prep call: tokens, heads, nope/latent/rope dims."""

    T: int
    H: int
    P: int
    L: int
    R: int
    block_size: int
    num_blocks: int


def _fail(arg: str, expected: str, got: object) -> None:
    raise ValueError(f"fused_decode_prep: argument '{arg}' must be {expected}, got {got}")


def _shape(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)} dtype {t.dtype}"


def check_kv_cache(kv_cache: torch.Tensor, kv_cache_dtype: str, *, fn: str = "fused_decode_prep") -> None:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"{fn}: argument 'kv_cache_dtype' must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    if kv_cache.dim() != 3:
        raise ValueError(f"{fn}: argument 'kv_cache' must be 3-D [num_blocks, block_size, L+R], got {_shape(kv_cache)}")
    if is_fp8_kv_cache(kv_cache_dtype):
        if kv_cache.dtype != torch.uint8 and kv_cache.dtype not in FP8_DTYPES:
            raise ValueError(
                f"{fn}: argument 'kv_cache' must be uint8 (fp8 bits) or an fp8 dtype when "
                f"kv_cache_dtype={kv_cache_dtype!r}, got dtype {kv_cache.dtype}"
            )
    elif kv_cache.dtype not in _MODEL_DTYPES:
        raise ValueError(
            f"{fn}: argument 'kv_cache' must be bf16/fp16/fp32 when kv_cache_dtype='auto', "
            f"got dtype {kv_cache.dtype} (an fp8 cache needs kv_cache_dtype='fp8')"
        )


def check_fused_decode_prep_args(
    q, kv_c, k_pe, w_uk_t, positions, cos_sin_cache, is_neox, slot_mapping,
    kv_cache, kv_cache_dtype, k_scale, q_scale, q_out,
) -> PrepDims:
    if q.dim() != 3:
        _fail("q", "3-D [T, H, P+R]", _shape(q))
    if q.dtype not in _MODEL_DTYPES:
        _fail("q", "bf16/fp16/fp32", _shape(q))
    T, H, PR = q.shape
    if w_uk_t.dim() != 3:
        _fail("w_uk_t", "3-D [H, P, L]", _shape(w_uk_t))
    Hw, P, L = w_uk_t.shape
    if Hw != H:
        _fail("w_uk_t", f"[H={H}, P, L] (heads of q)", _shape(w_uk_t))
    R = PR - P
    if R <= 0 or R % 2:
        _fail("q", f"last dim P+R with P={P} (from w_uk_t) and a positive even R", _shape(q))
    if kv_c.dim() != 2 or kv_c.shape != (T, L):
        _fail("kv_c", f"[T={T}, L={L}]", _shape(kv_c))
    if kv_c.dtype not in _MODEL_DTYPES:
        _fail("kv_c", "bf16/fp16/fp32", _shape(kv_c))
    if not (k_pe.shape == (T, R) or k_pe.shape == (T, 1, R)):
        _fail("k_pe", f"[T={T}, R={R}] or [T, 1, R]", _shape(k_pe))
    if w_uk_t.dtype not in _MODEL_DTYPES:
        _fail("w_uk_t", "bf16/fp16/fp32", _shape(w_uk_t))
    if positions.dim() != 1 or positions.shape[0] != T or positions.dtype not in _INT_DTYPES:
        _fail("positions", f"1-D int32/int64 of length T={T}", _shape(positions))
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != T or slot_mapping.dtype not in _INT_DTYPES:
        _fail("slot_mapping", f"1-D int32/int64 of length T={T}", _shape(slot_mapping))
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != R or not cos_sin_cache.is_floating_point():
        _fail("cos_sin_cache", f"floating [max_pos, R={R}] (cos | sin)", _shape(cos_sin_cache))
    if not isinstance(is_neox, bool):
        _fail("is_neox", "a bool", type(is_neox).__name__)
    check_kv_cache(kv_cache, kv_cache_dtype)
    if kv_cache.shape[2] != L + R:
        _fail("kv_cache", f"[num_blocks, block_size, L+R={L + R}]", _shape(kv_cache))
    if not is_fp8_kv_cache(kv_cache_dtype) and kv_cache.dtype != kv_c.dtype:
        _fail("kv_cache", f"dtype {kv_c.dtype} (that of kv_c) when kv_cache_dtype='auto'", _shape(kv_cache))
    if k_scale is None or k_scale.numel() != 1 or k_scale.dtype != torch.float32:
        _fail("k_scale", "a float32 tensor of one element", None if k_scale is None else _shape(k_scale))
    if q_out.shape != (T, H, L + R):
        _fail("q_out", f"[T={T}, H={H}, L+R={L + R}]", _shape(q_out))
    if q_scale is not None:
        if q_scale.numel() != 1 or q_scale.dtype != torch.float32:
            _fail("q_scale", "None or a float32 tensor of one element", _shape(q_scale))
        if q_out.dtype not in FP8_DTYPES:
            _fail("q_out", "an fp8 dtype (float8_e4m3fn / float8_e4m3fnuz) when q_scale is given", _shape(q_out))
    elif q_out.dtype != q.dtype:
        _fail("q_out", f"dtype {q.dtype} (that of q) when q_scale is None", _shape(q_out))
    devices = {t.device for t in (q, kv_c, k_pe, w_uk_t, positions, cos_sin_cache, slot_mapping, kv_cache, q_out)}
    if len(devices) != 1:
        raise ValueError(f"fused_decode_prep: all tensors must be on one device, got {sorted(map(str, devices))}")
    return PrepDims(T=T, H=H, P=P, L=L, R=R, block_size=kv_cache.shape[1], num_blocks=kv_cache.shape[0])
