"""Torch reference for the fused MLA decode prep (DESIGN §4.1).

The oracle every other backend is tested against, and the backend used on
CPU. Plain torch ops on any device; matmul and RoPE in fp32. It allocates
temporaries, so it is not the one to capture in a CUDA graph on a GPU.
"""

from __future__ import annotations

import torch

from .fp8 import as_fp8_cache, is_fp8_kv_cache, quantize_fp8
from .validate import check_index_ranges


def rope_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Rotate ``x[..., R]`` in fp32. ``cos``/``sin`` are ``[..., R/2]`` and
    broadcast against ``x`` without its last dim.

    NeoX pairs element ``i`` with ``i + R/2``; GPT-J pairs ``2i`` with ``2i+1``.
    """
    x = x.float()
    if is_neox:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def cos_sin_for(cos_sin_cache: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cs = cos_sin_cache.index_select(0, positions.long()).float()
    return cs.chunk(2, dim=-1)


def absorb_q_nope(q_nope: torch.Tensor, w_uk_t: torch.Tensor) -> torch.Tensor:
    """``[T, H, P] x [H, P, L] -> [T, H, L]`` in fp32."""
    return torch.bmm(q_nope.float().transpose(0, 1), w_uk_t.float()).transpose(0, 1)


def finish_q(q_cat: torch.Tensor, q_scale: torch.Tensor | None, q_out: torch.Tensor) -> None:
    """Write the fp32 ``[T, H, L+R]`` prepped q into ``q_out`` (quantized when
    ``q_scale`` is given, else cast)."""
    if q_scale is not None:
        q_out.copy_(quantize_fp8(q_cat, q_scale, q_out.dtype))
    else:
        q_out.copy_(q_cat)


def fused_decode_prep_reference(
    q, kv_c, k_pe, w_uk_t, positions, cos_sin_cache, is_neox, slot_mapping,
    kv_cache, kv_cache_dtype, k_scale, q_scale, q_out, dims, *, q_rows: int | None = None,
) -> None:
    """The reference backend (arguments: :mod:`.signature`, then ``dims``). ``q_rows``: absorb/concat/quant q only for rows
    ``[:q_rows]`` and zero the rest of ``q_out`` (RoPE and the cache write
    still cover every row); used on CPU only, see ``ops._decode_rows``."""
    P = dims.P
    # Index values are checked here (named errors instead of torch's IndexError);
    # a sync, which the reference can afford (not under CUDA-graph capture).
    check_index_ranges(positions, slot_mapping, cos_sin_cache.shape[0], dims.num_blocks * dims.block_size)
    cos, sin = cos_sin_for(cos_sin_cache, positions)

    q_pe = q[..., P:]
    q_pe_rot = rope_fp32(q_pe, cos[:, None, :], sin[:, None, :], is_neox)
    k_pe_flat = k_pe.select(1, 0) if k_pe.dim() == 3 else k_pe  # a view, whatever the strides
    k_pe_rot = rope_fp32(k_pe_flat, cos, sin, is_neox)

    n = dims.T if q_rows is None else q_rows
    ql_nope = absorb_q_nope(q[:n, :, :P], w_uk_t)
    finish_q(torch.cat((ql_nope, q_pe_rot[:n]), dim=-1), q_scale, q_out[:n])
    if n < dims.T:
        q_out[n:].zero_()

    # Cache write: rows with slot >= 0 only; a padded (-1) slot writes nothing.
    kv_row = torch.cat((kv_c.float(), k_pe_rot), dim=-1)
    # (block, offset) indexing works on any strided cache view, not only contiguous ones.
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    blk, off = slots // dims.block_size, slots % dims.block_size
    cache = as_fp8_cache(kv_cache) if is_fp8_kv_cache(kv_cache_dtype) else kv_cache
    if is_fp8_kv_cache(kv_cache_dtype):
        cache[blk, off] = quantize_fp8(kv_row[valid], k_scale, cache.dtype)
    else:
        cache[blk, off] = kv_row[valid].to(cache.dtype)

    # In-place rotation last, so the reads above see the un-rotated inputs.
    q_pe.copy_(q_pe_rot)
    k_pe_flat.copy_(k_pe_rot)


def gather_cache_rows_reference(kv_cache, slots, kv_cache_dtype, k_scale, dtype) -> torch.Tensor:
    """Rows ``slots`` of the cache as ``[N, L+R]``; padding and out-of-range
    slots read as zeros (as in the Triton gather)."""
    cache = as_fp8_cache(kv_cache) if is_fp8_kv_cache(kv_cache_dtype) else kv_cache
    bs = cache.shape[1]
    valid = (slots >= 0) & (slots < cache.shape[0] * bs)
    s = torch.where(valid, slots, torch.zeros_like(slots)).long()
    rows = cache[s // bs, s % bs].float()
    if is_fp8_kv_cache(kv_cache_dtype):
        rows = rows * k_scale.float()
    return torch.where(valid[:, None], rows, torch.zeros_like(rows)).to(dtype)
