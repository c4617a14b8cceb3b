"""Argument checks for :func:`mla_passes.kernels.fused_decode_prep`
(the arguments, in order, with shapes and meaning: :mod:`.signature`).

Every backend runs these before touching memory, so a bad call fails with an
error that names the argument and what was expected instead of a garbage
result or a device fault. :func:`check_fused_decode_prep_args` reads shapes,
dtypes, devices and address ranges only (no device sync), so it is safe under
CUDA-graph capture.

The VALUES of ``positions`` and ``slot_mapping`` live on the device; reading
them costs a sync. :func:`check_index_ranges` does that, and runs where it is
cheap or asked for: always in the reference backend (outside CUDA-graph
capture), and for every backend when ``MLA_PASSES_CHECK_INDICES=1``. Without
it the Triton kernel masks out-of-range rows (DESIGN §4.1): a position outside
``[0, max_pos)`` gives that token NaN rotary values, a slot outside
``[0, num_blocks * block_size)`` writes no cache row.

The rules on the operands a graph carries (q, kv_c, k_pe, positions, the
cos/sin table, the pairing flag, the cache dtype string, k_scale) are
:func:`graph_operand_problem`, written once: the kernel raises on them, and
the fusion pass asks the same function about the graph's fake values at
compile time and refuses the layer with the same words, so a graph the
kernel would refuse at run time is never rewritten. Sizes there may be
symbolic: :func:`same_size` compares them without adding a guard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import sympy
import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

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
    raise ValueError(problem_text((arg, expected, got)))


def problem_text(problem: tuple) -> str:
    """The error text of a rule's ``(argument, expected, got)``."""
    arg, expected, got = problem
    return f"fused_decode_prep: argument '{arg}' must be {expected}, got {got}"


def same_size(a, b) -> bool:
    """``a == b`` for sizes, ints or SymInts, never adding a guard. A symbolic
    pair counts as equal when the shape environment proves it, or when both
    are bare symbols it cannot compare (two unbacked token counts: sizes the
    caller supplies, equal only at run time, where the kernel checks them
    again). A constant against a symbol (``positions[:1]`` in a dynamic
    graph) or any other expression is not equal."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if statically_known_true(a == b):
        return True
    ea, eb = (x.node.expr if isinstance(x, torch.SymInt) else None for x in (a, b))
    return (isinstance(ea, sympy.Symbol) and isinstance(eb, sympy.Symbol)
            and not statically_known_true(a != b))


def _shape(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)} dtype {t.dtype}"


def _byte_range(t: torch.Tensor) -> tuple[int, int] | None:
    """[first, last + 1) bytes that ``t`` can touch (None when empty)."""
    if t.numel() == 0:
        return None
    span = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


def _may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' address ranges intersect (conservative: two views
    interleaved without sharing an element also count)."""
    if a.device != b.device:
        return False
    ra, rb = _byte_range(a), _byte_range(b)
    return ra is not None and rb is not None and ra[0] < rb[1] and rb[0] < ra[1]


def kv_cache_dtype_problem(kv_cache_dtype) -> tuple | None:
    """The cache dtypes the kernel writes (:data:`.fp8.KV_CACHE_DTYPES`)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        return "kv_cache_dtype", f"one of {KV_CACHE_DTYPES}", repr(kv_cache_dtype)
    return None


def positions_problem(positions, T) -> tuple | None:
    """One int32/int64 position per token of q."""
    if positions.dim() != 1 or not same_size(positions.shape[0], T) or positions.dtype not in _INT_DTYPES:
        return "positions", f"1-D int32/int64 of length T={T}", _shape(positions)
    return None


def scale_problem(name: str, scale, device, *, optional: bool = False) -> tuple | None:
    """A static per-tensor scale: one float32 element on ``device`` (q's)."""
    if scale is None:
        return None if optional else (name, "a float32 tensor of one element", None)
    if scale.numel() != 1 or scale.dtype != torch.float32:
        return name, ("None or " if optional else "") + "a float32 tensor of one element", _shape(scale)
    if scale.device != device:
        return name, f"on device {device} (that of q; the kernel reads it there)", f"device {scale.device}"
    return None


def graph_operand_problem(q, kv_c, k_pe, positions, cos_sin_cache, is_neox, kv_cache_dtype, k_scale,
                          *, P: int, R: int) -> tuple | None:
    """The first rule of the kernel that the operands a graph carries break,
    as ``(argument, expected, got)``; None if they keep them all. ``P`` and
    ``R``: the no-rope and rope widths of a q head. Works on real and on fake
    tensors (the fusion pass asks at compile time, sizes maybe symbolic)."""
    if q.dim() != 3 or q.shape[-1] != P + R:
        return "q", f"3-D [T, H, P+R={P + R}]", _shape(q)
    if q.dtype not in _MODEL_DTYPES:
        return "q", "bf16/fp16/fp32", _shape(q)
    T = q.shape[0]
    if kv_c.dim() != 2 or not same_size(kv_c.shape[0], T):
        return "kv_c", f"[T={T}, L]", _shape(kv_c)
    if kv_c.dtype not in _MODEL_DTYPES:
        return "kv_c", "bf16/fp16/fp32", _shape(kv_c)
    if not (k_pe.dim() in (2, 3) and same_size(k_pe.shape[0], T) and k_pe.shape[-1] == R
            and (k_pe.dim() == 2 or k_pe.shape[1] == 1)):
        return "k_pe", f"[T={T}, R={R}] or [T, 1, R]", _shape(k_pe)
    problem = positions_problem(positions, T)
    if problem:
        return problem
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != R or not cos_sin_cache.is_floating_point():
        return "cos_sin_cache", f"floating [max_pos, R={R}] (cos | sin)", _shape(cos_sin_cache)
    if not isinstance(is_neox, bool):
        return "is_neox", "a bool", type(is_neox).__name__
    return kv_cache_dtype_problem(kv_cache_dtype) or scale_problem("k_scale", k_scale, q.device)


def check_kv_cache(kv_cache: torch.Tensor, kv_cache_dtype: str, *, fn: str = "fused_decode_prep") -> None:
    if kv_cache_dtype_problem(kv_cache_dtype):
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
    T, H, PR = q.shape
    if w_uk_t.dim() != 3:
        _fail("w_uk_t", "3-D [H, P, L]", _shape(w_uk_t))
    Hw, P, L = w_uk_t.shape
    if Hw != H:
        _fail("w_uk_t", f"[H={H}, P, L] (heads of q)", _shape(w_uk_t))
    R = PR - P
    if R <= 0 or R % 2:
        _fail("q", f"last dim P+R with P={P} (from w_uk_t) and a positive even R", _shape(q))
    # the rules on what a graph carries; the fusion pass asks the same function at compile time
    problem = graph_operand_problem(q, kv_c, k_pe, positions, cos_sin_cache, is_neox, kv_cache_dtype, k_scale,
                                    P=P, R=R)
    if problem:
        raise ValueError(problem_text(problem))
    if kv_c.shape[1] != L:
        _fail("kv_c", f"[T={T}, L={L}]", _shape(kv_c))
    if w_uk_t.dtype not in _MODEL_DTYPES:
        _fail("w_uk_t", "bf16/fp16/fp32", _shape(w_uk_t))
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != T or slot_mapping.dtype not in _INT_DTYPES:
        _fail("slot_mapping", f"1-D int32/int64 of length T={T}", _shape(slot_mapping))
    check_kv_cache(kv_cache, kv_cache_dtype)
    if kv_cache.shape[2] != L + R:
        _fail("kv_cache", f"[num_blocks, block_size, L+R={L + R}]", _shape(kv_cache))
    if not is_fp8_kv_cache(kv_cache_dtype) and kv_cache.dtype != kv_c.dtype:
        _fail("kv_cache", f"dtype {kv_c.dtype} (that of kv_c) when kv_cache_dtype='auto'", _shape(kv_cache))
    if q_out.shape != (T, H, L + R):
        _fail("q_out", f"[T={T}, H={H}, L+R={L + R}]", _shape(q_out))
    problem = scale_problem("q_scale", q_scale, q.device, optional=True)
    if problem:
        raise ValueError(problem_text(problem))
    if q_scale is not None:
        if q_out.dtype not in FP8_DTYPES:
            _fail("q_out", "an fp8 dtype (float8_e4m3fn / float8_e4m3fnuz) when q_scale is given", _shape(q_out))
    elif q_out.dtype != q.dtype:
        _fail("q_out", f"dtype {q.dtype} (that of q) when q_scale is None", _shape(q_out))
    devices = {t.device for t in (q, kv_c, k_pe, w_uk_t, positions, cos_sin_cache, slot_mapping, kv_cache, q_out)}
    if len(devices) != 1:
        raise ValueError(f"fused_decode_prep: all tensors must be on one device, got {sorted(map(str, devices))}")
    # The outputs are written while the inputs are read: a shared address
    # range gives a result that depends on the order of the writes.
    inputs = dict(q=q, kv_c=kv_c, k_pe=k_pe, w_uk_t=w_uk_t, positions=positions,
                  cos_sin_cache=cos_sin_cache, slot_mapping=slot_mapping)
    for out_name, out in (("q_out", q_out), ("kv_cache", kv_cache)):
        for name, t in inputs.items():
            if _may_overlap(out, t):
                _fail(out_name, f"a tensor whose memory does not overlap '{name}'", "overlapping memory")
    if _may_overlap(q_out, kv_cache):
        _fail("q_out", "a tensor whose memory does not overlap 'kv_cache'", "overlapping memory")
    return PrepDims(T=T, H=H, P=P, L=L, R=R, block_size=kv_cache.shape[1], num_blocks=kv_cache.shape[0])


def index_checks_requested() -> bool:
    """``MLA_PASSES_CHECK_INDICES=1``: check index values on every call."""
    return os.environ.get("MLA_PASSES_CHECK_INDICES", "0") == "1"


def check_index_ranges(positions: torch.Tensor, slot_mapping: torch.Tensor, max_pos: int, n_slots: int,
                       *, fn: str = "fused_decode_prep") -> None:
    """Raise a ValueError naming ``positions`` / ``slot_mapping`` when a value
    is out of range: positions must lie in ``[0, max_pos)``, slots in
    ``[-inf, n_slots)`` (negative = padding, no write). Reads the values, so
    it syncs with the device; skipped during CUDA-graph capture (a sync there
    would break the capture)."""
    if positions.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if positions.numel():
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= max_pos:
            raise ValueError(f"{fn}: argument 'positions' must lie in [0, {max_pos}) (rows of cos_sin_cache), "
                             f"got values in [{lo}, {hi}]")
    if slot_mapping.numel():
        hi = int(slot_mapping.max())
        if hi >= n_slots:
            raise ValueError(f"{fn}: argument 'slot_mapping' must be < {n_slots} (num_blocks * block_size of "
                             f"kv_cache) or negative for padding, got {hi}")
