"""Inputs and an independent float64 oracle for the decode prep.

Shared by the test suite, the demo and the benchmarks so every consumer builds
inputs the same way: fresh random values (never zeros), padded slots, and a
cache whose untouched rows are poisoned so an unexpected write shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..kernels.fp8 import fp8_max, platform_fp8_dtype

POISON = 7.0  # what untouched cache rows / q_out margins hold (dequantized)


@dataclass
class DecodePrepCase:
    """The kernel's arguments (:mod:`mla_passes.kernels.signature`), in order, then ``meta``."""

    q: torch.Tensor
    kv_c: torch.Tensor
    k_pe: torch.Tensor
    w_uk_t: torch.Tensor
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    is_neox: bool
    slot_mapping: torch.Tensor
    kv_cache: torch.Tensor
    kv_cache_dtype: str
    k_scale: torch.Tensor
    q_scale: torch.Tensor | None
    q_out: torch.Tensor
    meta: dict = field(default_factory=dict)

    def kernel_args(self) -> tuple:
        return (
            self.q, self.kv_c, self.k_pe, self.w_uk_t, self.positions, self.cos_sin_cache,
            self.is_neox, self.slot_mapping, self.kv_cache, self.kv_cache_dtype, self.k_scale,
            self.q_scale, self.q_out,
        )

    def clone(self) -> "DecodePrepCase":
        c = lambda t: None if t is None else t.clone()  # noqa: E731
        return DecodePrepCase(
            c(self.q), c(self.kv_c), c(self.k_pe), c(self.w_uk_t), c(self.positions),
            c(self.cos_sin_cache), self.is_neox, c(self.slot_mapping), c(self.kv_cache),
            self.kv_cache_dtype, c(self.k_scale), c(self.q_scale), c(self.q_out), dict(self.meta),
        )


def make_cos_sin_cache(max_pos: int, rope_dim: int, base: float = 10000.0, dtype=torch.float32, device="cpu"):
    inv_freq = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype=dtype, device=device)


def make_case(
    T: int = 5,
    H: int = 16,
    P: int = 128,
    L: int = 512,
    R: int = 64,
    *,
    block_size: int = 16,
    num_blocks: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    kv_cache_dtype: str = "auto",
    cache_fp8_dtype: torch.dtype | None = None,
    q_fp8_dtype: torch.dtype | None = None,
    is_neox: bool = True,
    pad_every: int = 3,
    k_pe_3d: bool = False,
    strided: bool = True,
    max_pos: int = 4096,
    cos_sin_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> DecodePrepCase:
    """A random decode-prep call.

    ``kv_cache_dtype="fp8"`` gives a uint8 cache holding the platform fp8
    flavour, unless ``cache_fp8_dtype`` names a flavour (then the cache has
    that dtype). ``q_fp8_dtype`` set -> q is quantized with a random q_scale.
    Every ``pad_every``-th token gets slot -1 (0 disables). Slots are distinct
    and scattered across blocks. ``strided`` makes q_pe/k_pe/kv_c views of
    bigger tensors, as they are in vLLM.
    """
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale)  # noqa: E731
    if strided:
        q = rnd(T, H, P + R + 32)[..., : P + R].to(dtype).to(device)
        kv_lora = rnd(T, L + R + 8).to(dtype).to(device)
        kv_c, k_pe = kv_lora[:, :L], kv_lora[:, L : L + R]
    else:
        q = rnd(T, H, P + R).to(dtype).to(device)
        kv_c = rnd(T, L).to(dtype).to(device)
        k_pe = rnd(T, R).to(dtype).to(device)
    if k_pe_3d:
        k_pe = k_pe.unsqueeze(1)
    w_uk_t = rnd(H, P, L, scale=1.0 / math.sqrt(P)).to(dtype).to(device)
    positions = torch.randint(0, max_pos, (T,), generator=g).to(device)
    cos_sin_cache = make_cos_sin_cache(max_pos, R, dtype=cos_sin_dtype, device=device)

    num_blocks = num_blocks or max(2, (2 * T + block_size - 1) // block_size + 1)
    n_slots = num_blocks * block_size
    if n_slots < T:
        raise ValueError(f"make_case: {num_blocks} blocks of {block_size} hold fewer than T={T} slots")
    slots = torch.randperm(n_slots, generator=g)[:T]
    if pad_every:
        slots[::pad_every] = -1
    slot_mapping = slots.to(device)

    D = L + R
    k_scale = torch.tensor([0.5 + torch.rand(1, generator=g).item()], dtype=torch.float32, device=device)
    if kv_cache_dtype == "auto":
        kv_cache = torch.full((num_blocks, block_size, D), POISON, dtype=dtype, device=device)
    else:
        flavour = cache_fp8_dtype or platform_fp8_dtype(device)
        kv_cache = torch.full((num_blocks, block_size, D), POISON, dtype=torch.float32, device=device).to(flavour)
        if cache_fp8_dtype is None:
            kv_cache = kv_cache.view(torch.uint8)

    if q_fp8_dtype is not None:
        q_scale = torch.tensor([0.05 + 0.1 * torch.rand(1, generator=g).item()], dtype=torch.float32, device=device)
        q_out = torch.full((T, H, D), POISON, dtype=torch.float32, device=device).to(q_fp8_dtype)
    else:
        q_scale = None
        q_out = torch.full((T, H, D), POISON, dtype=dtype, device=device)
    return DecodePrepCase(
        q, kv_c, k_pe, w_uk_t, positions, cos_sin_cache, is_neox, slot_mapping, kv_cache,
        kv_cache_dtype, k_scale, q_scale, q_out,
        meta=dict(T=T, H=H, P=P, L=L, R=R, dtype=dtype, block_size=block_size),
    )


def _rope64(x: torch.Tensor, pos: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Rotation written out pair by pair in float64 (no chunk/stack tricks)."""
    R = x.shape[-1]
    half = R // 2
    cs = cos_sin_cache.double()[pos.long()]
    out = torch.empty_like(x, dtype=torch.float64)
    x = x.double()
    for i in range(half):
        c = cs[:, i].reshape((-1,) + (1,) * (x.dim() - 2))
        s = cs[:, half + i].reshape((-1,) + (1,) * (x.dim() - 2))
        a, b = (i, i + half) if is_neox else (2 * i, 2 * i + 1)
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., b] * c + x[..., a] * s
    return out


@dataclass
class Expected:
    q_cat: torch.Tensor        # [T, H, L+R] float64, before quant
    q_pe_rot: torch.Tensor     # [T, H, R] float64
    k_pe_rot: torch.Tensor     # [T, R] float64
    cache_rows: torch.Tensor   # [T, L+R] float64, what slot_mapping[t] should hold (before quant)


def oracle(case: DecodePrepCase) -> Expected:
    """Float64 formulation, independent of the kernels: einsum + per-pair RoPE."""
    P, R = case.meta["P"], case.meta["R"]
    T = case.q.shape[0]
    q = case.q.double()
    q_pe_rot = _rope64(q[..., P:], case.positions, case.cos_sin_cache, case.is_neox)
    k_pe_rot = _rope64(case.k_pe.reshape(T, R), case.positions, case.cos_sin_cache, case.is_neox)
    ql = torch.einsum("thp,hpl->thl", q[..., :P], case.w_uk_t.double())
    return Expected(
        q_cat=torch.cat((ql, q_pe_rot), dim=-1),
        q_pe_rot=q_pe_rot,
        k_pe_rot=k_pe_rot,
        cache_rows=torch.cat((case.kv_c.double(), k_pe_rot), dim=-1),
    )


def fp8_step(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Size of one fp8 quantization step at magnitude |x| (e4m3: 3 mantissa bits)."""
    finfo = torch.finfo(dtype)
    ax = x.abs().clamp(min=finfo.smallest_normal).double()
    return torch.exp2(torch.floor(torch.log2(ax)) - 3).clamp(max=fp8_max(dtype))
