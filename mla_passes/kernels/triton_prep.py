"""One Triton kernel for the whole MLA decode prep (DESIGN §4.1).

:func:`fused_decode_prep_triton` does, in ONE launch: the q-absorb
(``q_nope @ W_UK_T[h]``, fp32 accumulation), RoPE of ``q_pe`` and ``k_pe``
(NeoX or GPT-J pairs, written back in place), the concat into ``q_out``, the
static per-tensor fp8 quant of ``q_out`` (or a plain cast when ``q_scale`` is
None) and the latent-cache write of ``[kv_c | rope(k_pe)]`` for the tokens
whose slot is ``>= 0``.

Why one kernel: at decode sizes the step is bound by bytes, launches and
memory latency, not by arithmetic. The bytes are dominated by ``W_UK_T``
(``H*P*L`` elements, 16 MiB for DeepSeek-V3 at H=128).

A 1-D grid of two program roles (one branch on the program id):

* side programs first (``N_SIDE`` of them): ``SIDE_T`` tokens x ``SIDE_H``
  heads of q RoPE (in place, and quantized into ``q_out[..., L:]``), a slice
  of those tokens' kv_c columns into the cache rows of slot >= 0, and (the
  last head block) k RoPE, in place and into the cache. Every load is issued
  before the one dependent load (cos/sin rows at the positions), so such a
  program costs two memory round trips;
* absorb programs: ``BLOCK_T`` tokens x ``LB_ITERS`` tiles of ``BLOCK_L``
  latent columns of one head -> ``q_out[..., :L]``; a ``tl.dot`` per tile, or
  for a single token a GEMV (broadcast-multiply and sum over P, no 16-row
  padding). The programs of one W tile are adjacent in the grid, so a tile
  comes from DRAM once and from L2 for the other token blocks.

The small jobs no longer wait behind an absorb chain in the same program (the
previous design spread them over the absorb programs by masks), and an absorb
program's W loads depend on nothing. On an H200 (``mla-passes bench``, 8
layers per graph, GPT-J, fp8): 2.3-5.7 us at H=16 and 6.9-26.5 us at H=128
for T = 1..256 (the README's table).

Every memory location is read and written by exactly one program, so there is
no ordering inside the launch to get wrong. The wrapper allocates nothing and
never syncs with the host; the launch only reads device pointers, so it can be
captured in a CUDA graph and replayed with new contents in the same buffers.

fp8 targets: the platform flavour is stored with Triton's native cast (round
to nearest even, after a clamp to the finite max). ``float8_e4m3fnuz`` on a
machine whose Triton has no native cast for it (NVIDIA, the CPU interpreter)
is produced bit-exactly from the e4m3fn cast of ``2x`` (the two formats differ
only in exponent bias, and fnuz has no negative zero and a top code of 240).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .fp8 import fp8_max, is_fp8_kv_cache, platform_fp8_dtype

# Store modes for a destination tensor.
_CAST = 0        # plain cast to the pointer's element type
_FP8 = 1         # divide by the scale, clamp, native cast to fp8
_FP8_FNUZ_BITS = 2  # like _FP8, but e4m3fnuz bits into a uint8 view


@triton.jit
def _round_e4m3fn(y):
    """Round fp32 ``y`` (|y| <= 448) to the nearest e4m3fn value, ties to even,
    in fp32 arithmetic. Only used under the CPU interpreter, whose own
    fp32 -> fp8 cast drops the carry into the next binade (7.9 -> 4.0)."""
    bits = y.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
    sub = tl.abs((y * 512.0 + 12582912.0) - 12582912.0) * 0.001953125  # steps of 2^-9
    sub = tl.where(bits < 0, -sub, sub)
    return tl.where(tl.abs(y) < 0.015625, sub, normal)


@triton.jit
def _to_e4m3fn(y, INTERP: tl.constexpr):
    if INTERP:
        y = _round_e4m3fn(y)
    return y.to(tl.float8e4nv)


@triton.jit
def _fnuz_bits(y, INTERP: tl.constexpr):
    """e4m3fnuz bits (uint8) of fp32 ``y`` already clamped to +-240 (or NaN).

    fnuz(y) has the bit pattern of e4m3fn(2y) (exponent bias 8 vs 7), except
    that 2y above 448 has no finite e4m3fn code: the fnuz top code 0x7f (240)
    takes |y| > 232 (ties at 232 go to the even 224), and e4m3fn's negative
    zero 0x80 is fnuz's NaN, so it becomes +0.
    """
    two_y = tl.minimum(tl.maximum(y * 2.0, -448.0), 448.0)
    bits = _to_e4m3fn(two_y, INTERP).to(tl.uint8, bitcast=True)
    top = tl.where(y < 0, 0xFF, 0x7F).to(tl.uint8)
    bits = tl.where(tl.abs(y) > 232.0, top, bits)
    bits = tl.where(bits == 0x80, 0, bits)
    return tl.where(y != y, 0x80, bits).to(tl.uint8)  # NaN: fnuz's only NaN code


@triton.jit
def _store_out(ptrs, x, mask, inv_scale, MODE: tl.constexpr, FP8_MAX: tl.constexpr, INTERP: tl.constexpr):
    """Store fp32 ``x`` at ``ptrs``: cast, or static fp8 quant ``x * inv_scale``.

    ``inv_scale = 1 / scale`` is computed once per program, with the plain
    (branch-free, within 2 ulp) division: one multiply per element instead of
    an IEEE division, as vLLM's fp8 quant kernels do. It can move a value
    sitting within a few fp32 ulp of an fp8 rounding tie by one fp8 step.
    (An IEEE ``div_rn`` of the loaded scale before the W tile loads cost a
    whole memory round trip: its slow-path branch waits for the load.)"""
    if MODE == 0:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)
    else:
        y = x * inv_scale
        # clamp to the finite range; NaN stays NaN (min/max would turn it into +-max)
        y = tl.where(y != y, y, tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX))
        if MODE == 1:
            if INTERP:
                if ptrs.dtype.element_ty == tl.float8e4nv:
                    # the interpreter's own cast: no carry into the next binade, NaN -> 384
                    b = _round_e4m3fn(y).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
                    b = tl.where(y != y, 0x7F, b).to(tl.uint8)
                    tl.store(ptrs, b.to(tl.float8e4nv, bitcast=True), mask=mask)
                else:
                    tl.store(ptrs, y.to(ptrs.dtype.element_ty), mask=mask)
            else:
                tl.store(ptrs, y.to(ptrs.dtype.element_ty), mask=mask)
        else:
            tl.store(ptrs, _fnuz_bits(y, INTERP), mask=mask)


@triton.jit
def _cos_sin_scales(pos, tmask, i, imask, cs_ptr, s_cs0, s_cs1, MAX_POS, HALF: tl.constexpr,
                    qscale_ptr, kscale_ptr, Q_MODE: tl.constexpr, KV_MODE: tl.constexpr):
    """cos/sin rows at the positions (NaN for a position outside ``[0, MAX_POS)``)
    and the reciprocal q and k scales (see _store_out)."""
    q_scale = 1.0
    if Q_MODE != 0:
        q_scale = 1.0 / tl.load(qscale_ptr)
    k_scale = 1.0
    if KV_MODE != 0:
        k_scale = 1.0 / tl.load(kscale_ptr)
    pos_ok = (pos >= 0) & (pos < MAX_POS)
    cs = cs_ptr + tl.where(pos_ok, pos, 0)[:, None] * s_cs0
    pm = (tmask & pos_ok)[:, None] & imask[None, :]
    c = tl.load(cs + i[None, :] * s_cs1, mask=pm, other=float("nan")).to(tl.float32)
    sn = tl.load(cs + (i[None, :] + HALF) * s_cs1, mask=pm, other=float("nan")).to(tl.float32)
    return c, sn, q_scale, k_scale


@triton.jit
def _side_job(
    s, q_ptr, kvc_ptr, kpe_ptr, pos_ptr, cs_ptr, slot_ptr, cache_ptr, kscale_ptr, qscale_ptr, qout_ptr,
    T, H, MAX_POS, N_SLOTS,
    s_pos, s_slot, s_qt, s_qh, s_qd, s_ct, s_cd, s_kt, s_kd, s_cs0, s_cs1, s_cb, s_co, s_cx, s_ot, s_oh, s_od,
    P: tl.constexpr, L: tl.constexpr, R: tl.constexpr, BLOCK_SIZE: tl.constexpr, HALF_PAD: tl.constexpr,
    ST: tl.constexpr, SH: tl.constexpr, NHB: tl.constexpr, KVW: tl.constexpr, IS_NEOX: tl.constexpr,
    Q_MODE: tl.constexpr, Q_MAX: tl.constexpr, KV_MODE: tl.constexpr, KV_MAX: tl.constexpr,
    DO_Q: tl.constexpr, DO_C: tl.constexpr, INTERP: tl.constexpr, USE_PDL: tl.constexpr,
):
    """RoPE and cache rows of ``ST`` tokens: q_pe of heads ``[hb*SH, hb*SH+SH)``,
    kv_c columns ``[hb*KVW, hb*KVW+KVW)`` into the cache, and (last head block)
    k_pe rotated in place and into the cache. Loads first, the one dependent
    load (cos/sin rows at the positions) last.

    Rotary pairs: NeoX (i, i + R/2) as two contiguous half-row loads; GPT-J
    (2i, 2i+1) as ONE contiguous row load de-interleaved in registers
    (reshape to ``[..., R/2, 2]`` + split; join + reshape to store). Loading
    each GPT-J member through a stride-2 pointer instead (the previous kernel)
    made every element its own narrow load and store.

    Out-of-range indices (DESIGN §4.1): a token whose position is outside
    ``[0, MAX_POS)`` reads no cos/sin row; its rotated values are NaN. A slot
    outside ``[0, N_SLOTS)`` writes no cache row, like a padding slot."""
    HALF: tl.constexpr = R // 2
    R_PAD: tl.constexpr = 2 * HALF_PAD
    tb = s // NHB
    hb = s - tb * NHB
    offs_t = tb * ST + tl.arange(0, ST)
    tmask = offs_t < T
    t64 = offs_t.to(tl.int64)
    i = tl.arange(0, HALF_PAD)  # pair index
    imask = i < HALF
    r = tl.arange(0, R_PAD)     # element of a whole rotary row (GPT-J)
    rmask = r < R
    pos = tl.load(pos_ptr + t64 * s_pos, mask=tmask, other=0).to(tl.int64)
    slot = tl.load(slot_ptr + t64 * s_slot, mask=tmask, other=-1).to(tl.int64)
    if USE_PDL:  # what the previous kernel cannot have written first, then wait for it
        c, sn, q_scale, k_scale = _cos_sin_scales(pos, tmask, i, imask, cs_ptr, s_cs0, s_cs1, MAX_POS, HALF,
                                                  qscale_ptr, kscale_ptr, Q_MODE, KV_MODE)
        tl.extra.cuda.gdc_wait()
    offs_h = hb * SH + tl.arange(0, SH)
    qtm = tmask[:, None] & (offs_h < H)[None, :]
    q_row = q_ptr + (t64 * s_qt)[:, None, None] + (offs_h * s_qh)[None, :, None] + P * s_qd
    if DO_Q:
        if IS_NEOX:
            qm = qtm[:, :, None] & imask[None, None, :]
            y1 = tl.load(q_row + i[None, None, :] * s_qd, mask=qm, other=0.0).to(tl.float32)
            y2 = tl.load(q_row + (i + HALF)[None, None, :] * s_qd, mask=qm, other=0.0).to(tl.float32)
        else:
            qm = qtm[:, :, None] & rmask[None, None, :]
            y = tl.load(q_row + r[None, None, :] * s_qd, mask=qm, other=0.0).to(tl.float32)
            y1, y2 = tl.split(tl.reshape(y, [ST, SH, HALF_PAD, 2]))
    k_row = kpe_ptr + (t64 * s_kt)[:, None]
    last_hb = (tl.zeros([ST], dtype=tl.int32) + hb) == NHB - 1  # a block: masks need blocks
    ktm = tmask & last_hb
    offs_c = hb * KVW + tl.arange(0, KVW)
    cm = tmask[:, None] & (offs_c < L)[None, :]
    if DO_C:
        if IS_NEOX:
            km = ktm[:, None] & imask[None, :]
            x1 = tl.load(k_row + i[None, :] * s_kd, mask=km, other=0.0).to(tl.float32)
            x2 = tl.load(k_row + (i + HALF)[None, :] * s_kd, mask=km, other=0.0).to(tl.float32)
        else:
            km = ktm[:, None] & rmask[None, :]
            x = tl.load(k_row + r[None, :] * s_kd, mask=km, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, [ST, HALF_PAD, 2]))
        kv = tl.load(kvc_ptr + (t64 * s_ct)[:, None] + offs_c[None, :] * s_cd, mask=cm, other=0.0)
    if not USE_PDL:  # the one dependent load last
        c, sn, q_scale, k_scale = _cos_sin_scales(pos, tmask, i, imask, cs_ptr, s_cs0, s_cs1, MAX_POS, HALF,
                                                  qscale_ptr, kscale_ptr, Q_MODE, KV_MODE)

    if DO_Q:  # q_pe rotated in place and into q_out[..., L:]
        c3 = c[:, None, :]
        s3 = sn[:, None, :]
        ry1 = y1 * c3 - y2 * s3
        ry2 = y2 * c3 + y1 * s3
        o_row = qout_ptr + (t64 * s_ot)[:, None, None] + (offs_h * s_oh)[None, :, None] + L * s_od
        if IS_NEOX:
            tl.store(q_row + i[None, None, :] * s_qd, ry1.to(q_ptr.dtype.element_ty), mask=qm)
            tl.store(q_row + (i + HALF)[None, None, :] * s_qd, ry2.to(q_ptr.dtype.element_ty), mask=qm)
            _store_out(o_row + i[None, None, :] * s_od, ry1, qm, q_scale, Q_MODE, Q_MAX, INTERP)
            _store_out(o_row + (i + HALF)[None, None, :] * s_od, ry2, qm, q_scale, Q_MODE, Q_MAX, INTERP)
        else:
            ry = tl.reshape(tl.join(ry1, ry2), [ST, SH, R_PAD])
            tl.store(q_row + r[None, None, :] * s_qd, ry.to(q_ptr.dtype.element_ty), mask=qm)
            _store_out(o_row + r[None, None, :] * s_od, ry, qm, q_scale, Q_MODE, Q_MAX, INTERP)
    if DO_C:  # cache rows of in-range slots >= 0; k_pe in place for every token
        valid = (slot >= 0) & (slot < N_SLOTS)
        slot = tl.where(valid, slot, 0)
        blk = slot // BLOCK_SIZE  # a constant divisor: a shift for the usual powers of two
        c_row = cache_ptr + (blk * s_cb + (slot - blk * BLOCK_SIZE) * s_co)[:, None]
        _store_out(c_row + offs_c[None, :] * s_cx, kv.to(tl.float32), cm & valid[:, None],
                   k_scale, KV_MODE, KV_MAX, INTERP)
        r1 = x1 * c - x2 * sn
        r2 = x2 * c + x1 * sn
        vm = km & valid[:, None]
        if IS_NEOX:
            _store_out(c_row + (L + i[None, :]) * s_cx, r1, vm, k_scale, KV_MODE, KV_MAX, INTERP)
            _store_out(c_row + (L + HALF + i[None, :]) * s_cx, r2, vm, k_scale, KV_MODE, KV_MAX, INTERP)
            tl.store(k_row + i[None, :] * s_kd, r1.to(kpe_ptr.dtype.element_ty), mask=km)
            tl.store(k_row + (i + HALF)[None, :] * s_kd, r2.to(kpe_ptr.dtype.element_ty), mask=km)
        else:
            rk = tl.reshape(tl.join(r1, r2), [ST, R_PAD])
            _store_out(c_row + (L + r[None, :]) * s_cx, rk, vm, k_scale, KV_MODE, KV_MAX, INTERP)
            tl.store(k_row + r[None, :] * s_kd, rk.to(kpe_ptr.dtype.element_ty), mask=km)


@triton.jit
def _load_w_tile(w_base, offs_p, l0, s_wl, P: tl.constexpr, L: tl.constexpr, BLOCK_L: tl.constexpr,
                 EVEN_P: tl.constexpr, EVEN_L: tl.constexpr):
    offs_l = l0 + tl.arange(0, BLOCK_L)
    w_ptrs = w_base + offs_l[None, :] * s_wl
    if EVEN_P and EVEN_L:
        return tl.load(w_ptrs)
    return tl.load(w_ptrs, mask=(offs_p < P)[:, None] & (offs_l < L)[None, :], other=0.0)


@triton.jit
def _absorb_job(
    a_id, q_ptr, w_ptr, qscale_ptr, qout_ptr,
    T, N_TB,
    s_qt, s_qh, s_qd, s_wh, s_wp, s_wl, s_ot, s_oh, s_od,
    P: tl.constexpr, L: tl.constexpr, P_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, LB_ITERS: tl.constexpr, NUM_LC: tl.constexpr,
    GEMV: tl.constexpr, Q_MODE: tl.constexpr, Q_MAX: tl.constexpr, DOT_F32: tl.constexpr, INTERP: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """``q_out[tokens, h, chunk] = q_nope[tokens, h] @ W_UK_T[h][:, chunk]``: a
    block of ``BLOCK_T`` tokens (the programs of one W tile are adjacent, so a
    tile comes from DRAM once and from L2 after), ``LB_ITERS`` column tiles of
    ``BLOCK_L``. ``GEMV``: broadcast-multiply and sum over P in fp32 (no
    16-row padding of a tl.dot) for a handful of tokens."""
    EVEN_P: tl.constexpr = P == P_PAD
    EVEN_L: tl.constexpr = (L % (BLOCK_L * LB_ITERS)) == 0
    tb = a_id % N_TB
    hl = a_id // N_TB
    h = hl // NUM_LC
    lc = hl - h * NUM_LC
    offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = offs_t < T
    t64 = offs_t.to(tl.int64)
    offs_p = tl.arange(0, P_PAD)
    w_base = w_ptr + h * s_wh + offs_p[:, None] * s_wp
    o_base = qout_ptr + (t64 * s_ot)[:, None] + h * s_oh
    q_scale = 1.0
    if Q_MODE != 0:
        q_scale = 1.0 / tl.load(qscale_ptr)  # the reciprocal: see _store_out
    if USE_PDL:  # the first W tile (a weight: no kernel before us writes it), then wait for q
        w0 = _load_w_tile(w_base, offs_p, lc * LB_ITERS * BLOCK_L, s_wl, P, L, BLOCK_L, EVEN_P, EVEN_L)
        tl.extra.cuda.gdc_wait()
    a_ptrs = q_ptr + (t64 * s_qt)[:, None] + h * s_qh + offs_p[None, :] * s_qd
    if EVEN_P:
        a = tl.load(a_ptrs, mask=tmask[:, None], other=0.0)
    else:
        a = tl.load(a_ptrs, mask=tmask[:, None] & (offs_p < P)[None, :], other=0.0)
    if DOT_F32 or GEMV:
        a = a.to(tl.float32)
    for j in tl.static_range(LB_ITERS):
        offs_l = (lc * LB_ITERS + j) * BLOCK_L + tl.arange(0, BLOCK_L)
        if USE_PDL and j == 0:
            w = w0
        else:
            w = _load_w_tile(w_base, offs_p, (lc * LB_ITERS + j) * BLOCK_L, s_wl, P, L, BLOCK_L, EVEN_P, EVEN_L)
        if GEMV:
            acc = tl.sum(a[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        elif DOT_F32:
            acc = tl.dot(a, w.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(a, w)
        if EVEN_L:
            o_mask = tmask[:, None]
        else:
            o_mask = tmask[:, None] & (offs_l < L)[None, :]
        _store_out(o_base + offs_l[None, :] * s_od, acc, o_mask, q_scale, Q_MODE, Q_MAX, INTERP)


@triton.jit
def _mla_decode_prep_kernel(
    q_ptr, kvc_ptr, kpe_ptr, w_ptr, pos_ptr, cs_ptr, slot_ptr, cache_ptr,
    kscale_ptr, qscale_ptr, qout_ptr,
    T, H, N_SIDE, N_TB, MAX_POS, N_SLOTS,
    s_pos, s_slot,
    s_qt, s_qh, s_qd,
    s_ct, s_cd,
    s_kt, s_kd,
    s_wh, s_wp, s_wl,
    s_cs0, s_cs1,
    s_cb, s_co, s_cx,
    s_ot, s_oh, s_od,
    P: tl.constexpr, L: tl.constexpr, R: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    P_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, LB_ITERS: tl.constexpr, NUM_LC: tl.constexpr,
    GEMV: tl.constexpr, ST: tl.constexpr, SH: tl.constexpr, NHB: tl.constexpr, KVW: tl.constexpr,
    IS_NEOX: tl.constexpr,
    Q_MODE: tl.constexpr, Q_MAX: tl.constexpr,
    KV_MODE: tl.constexpr, KV_MAX: tl.constexpr,
    DOT_F32: tl.constexpr, INTERP: tl.constexpr, DO_Q: tl.constexpr, DO_C: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < N_SIDE:
        _side_job(pid, q_ptr, kvc_ptr, kpe_ptr, pos_ptr, cs_ptr, slot_ptr, cache_ptr, kscale_ptr, qscale_ptr,
                  qout_ptr, T, H, MAX_POS, N_SLOTS,
                  s_pos, s_slot, s_qt, s_qh, s_qd, s_ct, s_cd, s_kt, s_kd, s_cs0, s_cs1, s_cb, s_co, s_cx, s_ot, s_oh, s_od,
                  P, L, R, BLOCK_SIZE, HALF_PAD, ST, SH, NHB, KVW, IS_NEOX,
                  Q_MODE, Q_MAX, KV_MODE, KV_MAX, DO_Q, DO_C, INTERP, USE_PDL)
    else:
        _absorb_job(pid - N_SIDE, q_ptr, w_ptr, qscale_ptr, qout_ptr, T, N_TB,
                    s_qt, s_qh, s_qd, s_wh, s_wp, s_wl, s_ot, s_oh, s_od,
                    P, L, P_PAD, BLOCK_T, BLOCK_L, LB_ITERS, NUM_LC,
                    GEMV, Q_MODE, Q_MAX, DOT_F32, INTERP, USE_PDL)


@triton.jit
def _gather_rows_kernel(
    cache_ptr, slot_ptr, scale_ptr, out_ptr,
    N, D, N_SLOTS,
    s_slot, s_cb, s_co, s_cx, s_on, s_od,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DEQUANT: tl.constexpr, FNUZ_BITS: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    nmask = offs_n < N
    dmask = offs_d < D
    slot = tl.load(slot_ptr + offs_n.to(tl.int64) * s_slot, mask=nmask, other=-1).to(tl.int64)
    valid = nmask & (slot >= 0) & (slot < N_SLOTS)
    slot = tl.where(valid, slot, 0)
    blk = slot // BLOCK_SIZE
    row = blk * s_cb + (slot - blk * BLOCK_SIZE) * s_co
    m = valid[:, None] & dmask[None, :]
    raw = tl.load(cache_ptr + row[:, None] + offs_d[None, :] * s_cx, mask=m)  # masked-off: see where below
    if FNUZ_BITS:
        # e4m3fnuz code c reads as e4m3fn(c) / 2; its top code 0x7f is 240, 0x80 is NaN
        x = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32) * 0.5
        mag = raw & 0x7F
        x = tl.where(mag == 0x7F, tl.where(raw >= 0x80, -240.0, 240.0), x)
        x = tl.where(raw == 0x80, float("nan"), x)
    else:
        x = raw.to(tl.float32)
    if DEQUANT:
        x = x * tl.load(scale_ptr)
    x = tl.where(m, x, 0.0)
    out_ptrs = out_ptr + offs_n[:, None].to(tl.int64) * s_on + offs_d[None, :] * s_od
    tl.store(out_ptrs, x.to(out_ptr.dtype.element_ty), mask=nmask[:, None] & dmask[None, :])


@triton.jit
def _cache_write_kernel(kvc_ptr, kpe_ptr, slot_ptr, cache_ptr, scale_ptr,
                        s_ct, s_kt, s_cb, s_co,
                        BLOCK_SIZE: tl.constexpr, L: tl.constexpr, R: tl.constexpr, MODE: tl.constexpr, FP8_MAX: tl.constexpr,
                        INTERP: tl.constexpr):
    """Unfused cache write only (one program per token): the stand-in for
    vLLM's ``concat_and_cache_mla`` in the benchmark's unfused chain."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        row = cache_ptr + blk * s_cb + (slot - blk * BLOCK_SIZE) * s_co
        scale = 1.0
        if MODE != 0:
            scale = 1.0 / tl.load(scale_ptr)
        offs = tl.arange(0, L)
        x = tl.load(kvc_ptr + t * s_ct + offs).to(tl.float32)
        _store_out(row + offs, x, offs < L, scale, MODE, FP8_MAX, INTERP)
        offs_r = tl.arange(0, R)
        y = tl.load(kpe_ptr + t * s_kt + offs_r).to(tl.float32)
        _store_out(row + L + offs_r, y, offs_r < R, scale, MODE, FP8_MAX, INTERP)


# --------------------------------------------------------------------- host side


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fp8_target(t: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """The tensor to hand the kernel for an fp8 destination, its store mode and
    finite max. A uint8 tensor holds the platform flavour's bits."""
    dtype = platform_fp8_dtype(t.device) if t.dtype == torch.uint8 else t.dtype
    if dtype == torch.float8_e4m3fnuz and torch.version.hip is None:
        return t.view(torch.uint8), _FP8_FNUZ_BITS, fp8_max(dtype)
    return (t if t.dtype == dtype else t.view(dtype)), _FP8, fp8_max(dtype)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pdl_enabled(device: torch.device) -> bool:
    """Whether launches use programmatic dependent launch: ``MLA_PASSES_PDL=1``
    on a CUDA GPU of compute capability 9.0 or newer (Hopper+), not under the
    interpreter. Off by default: see ``docs/performance.md`` ("Levers measured") for what it
    measured inside a decode step."""
    if os.environ.get("MLA_PASSES_PDL", "0") != "1" or _interpreting():
        return False
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def launch_config(T: int, H: int, L: int, device: torch.device, P: int = 128) -> dict:
    """Block sizes for one call (and ``PDL``, :func:`pdl_enabled`); a function
    of the shape only (graph-stable).

    Absorb programs: ``BLOCK_T`` tokens x ``LB_ITERS`` tiles of ``BLOCK_L``
    latent columns of one head (``GEMV``: no tl.dot, for a few tokens). Side
    programs: ``SIDE_T`` tokens x ``SIDE_H`` heads of q RoPE, plus a slice of
    those tokens' cache rows.

    From H200 sweeps of both RoPE conventions (``tools/sweeps/kernel_sweep.py`` and
    ``mla-passes bench --sweep``, DeepSeek-V3 dims, bf16, fp8 cache and q, 8
    layers per CUDA graph): one token -> GEMV over 64-column tiles (a GEMV
    over 2-4 tokens lost to a 16-row tl.dot at 128 heads); otherwise one
    token block covering the batch up to 64 tokens, then 128-token blocks,
    64-column tiles (128 for 64-token blocks of many heads), 8 warps; from
    256 tokens of many heads 4 warps and, from 512, 64 x 128 blocks. Side
    programs of 16 heads: 1 token each for small batches, 2 from 64 tokens
    (128 for few heads), 4 tokens x 32 heads from 256 tokens of many heads.
    Rerun ``mla-passes bench --sweep`` to see the timings behind a choice.
    """
    cfg = _launch_blocks(T, H, L, P)
    cfg["PDL"] = pdl_enabled(device)
    return cfg


def _launch_blocks(T: int, H: int, L: int, P: int) -> dict:
    l_pad, p_pad = _next_pow2(L), max(16, _next_pow2(P))
    many = H >= 64 and T >= 256
    if many:
        side = dict(SIDE_T=4, SIDE_H=32)
    elif T >= 128 or (T >= 64 and H >= 64):
        side = dict(SIDE_T=2, SIDE_H=16)
    else:
        side = dict(SIDE_T=1, SIDE_H=16)
    if T == 1:  # the [P, BLOCK_L] product of a GEMV tile lives in registers: <= 8192 elements
        bl = min(64, l_pad)
        while bl > 16 and p_pad * bl > 8192:
            bl //= 2
        return dict(BLOCK_T=1, BLOCK_L=bl, LB_ITERS=1, GEMV=True, num_warps=4, num_stages=2, **side)
    if T <= 64:
        bt = max(16, _next_pow2(T))
        bl = 128 if bt == 64 and H >= 64 else 64
        nw = 8 if bt == 64 else 4
    elif many:
        bt, bl, nw = (128, 64, 4) if T < 512 else (64, 128, 4)
    else:
        bt, bl, nw = 128, 64, 8
    return dict(BLOCK_T=bt, BLOCK_L=min(bl, l_pad), LB_ITERS=1, GEMV=False, num_warps=nw, num_stages=2, **side)


# Which parts of the kernel run (``launch(..., parts=...)``); the production
# entry point runs all of them, the benchmarks time them apart.
ABSORB, CACHE_AND_K_ROPE, Q_ROPE = 1, 2, 4
ALL_PARTS = ABSORB | CACHE_AND_K_ROPE | Q_ROPE


def fused_decode_prep_triton(
    q, kv_c, k_pe, w_uk_t, positions, cos_sin_cache, is_neox, slot_mapping,
    kv_cache, kv_cache_dtype, k_scale, q_scale, q_out, dims,
):
    """The Triton backend of :func:`mla_passes.kernels.fused_decode_prep`.

    Arguments as there (:mod:`.signature`); ``dims`` is the :class:`~.validate.PrepDims` the
    argument checks returned. One launch with :func:`launch_config`'s blocks,
    no allocation, no host sync. Returns Triton's compiled-kernel handle
    (registers, spills) or None.
    """
    cfg = launch_config(dims.T, dims.H, dims.L, q.device, dims.P)
    return launch(q, kv_c, k_pe, w_uk_t, positions, cos_sin_cache, is_neox, slot_mapping,
                  kv_cache, kv_cache_dtype, k_scale, q_scale, q_out, dims, cfg)


def launch(
    q, kv_c, k_pe, w_uk_t, positions, cos_sin_cache, is_neox, slot_mapping,
    kv_cache, kv_cache_dtype, k_scale, q_scale, q_out, dims, cfg: dict, parts: int = ALL_PARTS,
):
    """Launch the kernel with an explicit block configuration ``cfg`` (the
    keys of :func:`launch_config`) and the kernel ``parts`` to run (a mask of
    ``ABSORB | CACHE_AND_K_ROPE | Q_ROPE``). For the benchmarks and the
    config tests; arguments are not checked here."""
    T, H, P, L, R = dims.T, dims.H, dims.P, dims.L, dims.R
    if T == 0:
        return None
    if is_fp8_kv_cache(kv_cache_dtype):
        cache, kv_mode, kv_max = _fp8_target(kv_cache)
    else:
        cache, kv_mode, kv_max = kv_cache, _CAST, 0.0
    if q_scale is not None:
        qo, q_mode, q_max = _fp8_target(q_out)
    else:
        qo, q_mode, q_max = q_out, _CAST, 0.0

    block_t, block_l, iters = cfg["BLOCK_T"], cfg["BLOCK_L"], cfg["LB_ITERS"]
    gemv = bool(cfg.get("GEMV", False)) or block_t < 16
    num_lc = triton.cdiv(L, block_l * iters)
    n_tb = triton.cdiv(T, block_t)
    st, sh = cfg["SIDE_T"], min(cfg["SIDE_H"], _next_pow2(H))
    nhb = triton.cdiv(H, sh)
    kvw = _next_pow2(triton.cdiv(L, nhb))
    n_side = triton.cdiv(T, st) * nhb if parts & (CACHE_AND_K_ROPE | Q_ROPE) else 0
    n_abs = H * num_lc * n_tb if parts & ABSORB else 0
    if n_side + n_abs == 0:
        return None
    # tl.dot needs one operand dtype; fp32 when the two differ, for fp32
    # models, and for bf16 under the CPU interpreter (its bf16 dot is wrong).
    # programmatic dependent launch (Hopper+): the launch may start before the previous
    # kernel ends; the kernel waits (gdc_wait) before its first read of anything it produced
    pdl = bool(cfg.get("PDL", False)) and not _interpreting()
    extra = dict(launch_pdl=True) if pdl else {}
    dot_f32 = (q.dtype != w_uk_t.dtype or q.dtype == torch.float32
               or (q.dtype == torch.bfloat16 and _interpreting()))
    return _mla_decode_prep_kernel[(n_side + n_abs,)](
        q, kv_c, k_pe, w_uk_t, positions, cos_sin_cache, slot_mapping, cache,
        k_scale, q_scale if q_scale is not None else k_scale, qo,
        T, H, n_side, n_tb, cos_sin_cache.shape[0], dims.num_blocks * dims.block_size,
        positions.stride(0), slot_mapping.stride(0),
        q.stride(0), q.stride(1), q.stride(2),
        kv_c.stride(0), kv_c.stride(1),
        k_pe.stride(0), k_pe.stride(-1),
        w_uk_t.stride(0), w_uk_t.stride(1), w_uk_t.stride(2),
        cos_sin_cache.stride(0), cos_sin_cache.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2),
        P=P, L=L, R=R, BLOCK_SIZE=dims.block_size, P_PAD=max(16, _next_pow2(P)), HALF_PAD=_next_pow2(R // 2),
        BLOCK_T=block_t, BLOCK_L=block_l, LB_ITERS=iters, NUM_LC=num_lc,
        GEMV=gemv, ST=st, SH=sh, NHB=nhb, KVW=kvw,
        IS_NEOX=bool(is_neox),
        Q_MODE=q_mode, Q_MAX=q_max, KV_MODE=kv_mode, KV_MAX=kv_max,
        DOT_F32=dot_f32, INTERP=_interpreting(), DO_Q=bool(parts & Q_ROPE), DO_C=bool(parts & CACHE_AND_K_ROPE),
        USE_PDL=pdl, num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 2), **extra,
    )


def gather_cache_rows_triton(kv_cache, slots, kv_cache_dtype, k_scale, dtype) -> torch.Tensor:
    """Triton version of :func:`mla_passes.kernels.gather_cache_rows`: one
    launch, output ``[len(slots), L+R]`` in ``dtype`` (a fresh tensor)."""
    N, D = slots.shape[0], kv_cache.shape[-1]
    out = torch.empty((N, D), dtype=dtype, device=kv_cache.device)
    if N == 0:
        return out
    fp8 = is_fp8_kv_cache(kv_cache_dtype)
    cache, fnuz_bits = kv_cache, False
    if fp8:
        cache, mode, _ = _fp8_target(kv_cache)
        fnuz_bits = mode == _FP8_FNUZ_BITS
    BLOCK_N, BLOCK_D = 16, 128
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(D, BLOCK_D))
    _gather_rows_kernel[grid](
        cache, slots, k_scale, out, N, D, kv_cache.shape[0] * kv_cache.shape[1],
        slots.stride(0), cache.stride(0), cache.stride(1), cache.stride(2), out.stride(0), out.stride(1),
        BLOCK_SIZE=kv_cache.shape[1], BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, DEQUANT=fp8, FNUZ_BITS=fnuz_bits,
    )
    return out


def concat_and_cache_mla_triton(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale) -> None:
    """Only the cache write ``[kv_c | k_pe] -> kv_cache[slot]`` (k_pe already
    rotated; L and R powers of two). For baselines; not part of the fused path."""
    if is_fp8_kv_cache(kv_cache_dtype):
        cache, mode, fmax = _fp8_target(kv_cache)
    else:
        cache, mode, fmax = kv_cache, _CAST, 0.0
    T = kv_c.shape[0]
    if T == 0:
        return
    _cache_write_kernel[(T,)](
        kv_c, k_pe, slot_mapping, cache, k_scale,
        kv_c.stride(0), k_pe.stride(0), cache.stride(0), cache.stride(1),
        BLOCK_SIZE=cache.shape[1], L=kv_c.shape[1], R=k_pe.shape[-1], MODE=mode, FP8_MAX=fmax, INTERP=_interpreting(),
    )
