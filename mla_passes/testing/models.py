"""A small DeepSeek-style MLA decode stack, built from the stand-in ops.

Used by the pass tests, the ``mla-passes demo`` tool and the pass benchmark
to produce the graph forms of DESIGN §3 without vLLM:

* ``form="raw"``: RoPE as aten ops written the way vLLM's native rotary
  embedding writes them (``rope="native"``: ``index_select`` + ``chunk``;
  ``rope="deepseek"``: ``cos_sin_cache[positions]`` + ``repeat_interleave``/``cat``),
  NeoX or GPT-J pairing, the rotated ``q_pe`` assigned back into ``q``
  (``q[..., P:] = ...``), then the stand-in KV-cache update and attention
  (``kv_cache_dummy_dep=`` the update's token);
* ``form="fused_rope"``: the stand-in fused RoPE + cache update on
  ``q[..., P:]`` and ``k_pe`` (the form vLLM's own MLA RoPE/KV-cache fusion
  leaves), then the attention.

Each layer passes its ``layer_name`` as a :class:`mla_passes.LayerName`
built in ``forward``, so torch.compile hoists it into an opaque graph input
as vLLM's does. :func:`build_decode_stack` returns the module and its layer
states (registered in ``mla_passes.layers.local_layers``);
:func:`set_step` sets the per-step slot mapping / decode split on every layer.

Example::

    stack = build_decode_stack(num_layers=2, H=16)
    hidden, positions = stack.make_inputs(T=4)
    set_step(stack, T=4, seed=1)
    out = stack.module(positions, hidden)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers import local_layers
from ..ops import LayerName
from . import standins
from .cases import make_cos_sin_cache

# DeepSeek-V3 attention dims
DSV3 = dict(H=128, P=128, L=512, R=64, V=128, hidden=7168, q_lora=1536)


def _rope_native(positions, q_pe, k_pe, cos_sin_cache, is_neox, *, view_per_read=False):
    """vLLM-native style: index_select + chunk; x1/x2 by halves or by step-2
    slices. ``view_per_read``: each read of x goes through its own view of
    the input, as in the graph vLLM traces (no CSE yet): separate but
    identical view nodes."""
    T = positions.shape[0]
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)

    def rot(x_in):
        shape = x_in.shape

        def xv():
            return x_in.view(T, -1, shape[-1])

        x = xv()
        c = cos.unsqueeze(-2).to(x.dtype)
        s = sin.unsqueeze(-2).to(x.dtype)
        if is_neox:
            x1, x2 = torch.chunk(x, 2, dim=-1)
        else:
            x1, x2 = x[..., ::2], (xv() if view_per_read else x)[..., 1::2]
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        if is_neox:
            y = torch.cat((o1, o2), dim=-1)
        else:
            y = torch.stack((o1, o2), dim=-1).flatten(-2)
        return y.reshape(shape)

    return rot(q_pe), rot(k_pe)


def _rope_deepseek(positions, q_pe, k_pe, cos_sin_cache, is_neox, *, view_per_read=False):
    """DeepSeek-scaling style: cos_sin_cache[positions], full-width cos/sin,
    rotate_fn. ``view_per_read``: as in :func:`_rope_native`."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    if is_neox:
        cos = torch.cat((cos, cos), dim=-1).unsqueeze(-2)
        sin = torch.cat((sin, sin), dim=-1).unsqueeze(-2)
    else:
        cos = cos.repeat_interleave(2, dim=-1).unsqueeze(-2)
        sin = sin.repeat_interleave(2, dim=-1).unsqueeze(-2)

    def fresh(x):  # a separate view node over the same memory (a same-shape view would be dropped as a no-op)
        return x.unsqueeze(0).squeeze(0) if view_per_read else x

    def rotate(x):
        if is_neox:
            x1, x2 = x[..., : x.shape[-1] // 2], fresh(x)[..., x.shape[-1] // 2:]
            return torch.cat((-x2, x1), dim=-1)
        x1, x2 = x[..., ::2], fresh(x)[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)

    q = (fresh(q_pe) * cos + rotate(q_pe) * sin).to(q_pe.dtype)
    k = (fresh(k_pe) * cos + rotate(k_pe) * sin).to(k_pe.dtype)
    return q, k


ROPES = {
    "native": _rope_native,
    "deepseek": _rope_deepseek,
    # the same math, each read of the rotated input through its own view (vLLM's traced graph)
    "native_views": functools.partial(_rope_native, view_per_read=True),
    "deepseek_views": functools.partial(_rope_deepseek, view_per_read=True),
}


class MLADecodeLayer(nn.Module):
    """One MLA attention block (projections, RoPE, cache update, attention)."""

    def __init__(self, name, state, *, hidden, P, L, R, V, form, rope, is_neox, dtype, generator):
        super().__init__()
        H = state.w_uk_t.shape[0]
        self.layer_name, self.H, self.P, self.L, self.R, self.V = name, H, P, L, R, V
        self.form, self.rope, self.is_neox = form, rope, is_neox
        self.kv_cache_dtype = state.kv_cache_dtype
        g = generator
        w = lambda *s: nn.Parameter(  # noqa: E731
            (torch.randn(*s, generator=g) / math.sqrt(s[0])).to(dtype), requires_grad=False)
        self.w_q = w(hidden, H * (P + R))
        self.w_kv = w(hidden, L + R)
        self.w_o = w(H * V, hidden)
        self.register_buffer("k_scale", state.k_scale.clone())

    def forward(self, positions, hidden, cos_sin_cache):
        T = hidden.shape[0]
        ln = LayerName(self.layer_name)
        q = (hidden @ self.w_q).view(-1, self.H, self.P + self.R)
        kv_lora = hidden @ self.w_kv
        kv_c, k_pe = kv_lora.split([self.L, self.R], dim=-1)
        kv_c_normed = kv_c * torch.rsqrt(kv_c.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(kv_c.dtype)
        if self.form == "raw":
            k_pe = k_pe.unsqueeze(1)
            q[..., self.P:], k_pe = ROPES[self.rope](positions, q[..., self.P:], k_pe, cos_sin_cache, self.is_neox)
            dep = standins.kv_cache_update(kv_c_normed, k_pe, ln, self.kv_cache_dtype, self.k_scale)
        else:
            dep = standins.fused_rope_kv_cache_update(
                positions, q[..., self.P:], k_pe, kv_c_normed, cos_sin_cache, self.is_neox,
                self.kv_cache_dtype, self.k_scale, ln)
            k_pe = k_pe.unsqueeze(1)
        output = torch.empty((T, self.H * self.V), dtype=q.dtype, device=q.device)
        standins.attention_with_output(q, kv_c_normed, k_pe, output, ln, kv_cache_dummy_dep=dep)
        return hidden + output @ self.w_o


class MLADecodeStack(nn.Module):
    def __init__(self, layers, cos_sin_cache):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.register_buffer("cos_sin_cache", cos_sin_cache)

    def forward(self, positions, hidden):
        for layer in self.layers:
            hidden = layer(positions, hidden, self.cos_sin_cache)
        return hidden


class RopeLayer(nn.Module):
    """Layer 0 of ``stack`` with the RoPE ``fn(positions, q_pe, k_pe, cos_sin_cache, is_neox)``
    in place of its own; returns the layer's output and the rotated q_pe as q holds it.
    For tests that swap in a RoPE written another way (casts, edits, positions)."""

    def __init__(self, stack, fn):
        super().__init__()
        self.ly = stack.module.layers[0]
        self.cos_sin_cache = stack.module.cos_sin_cache
        self.fn = fn

    def forward(self, positions, hidden):
        ly = self.ly
        P, R, L, H = ly.P, ly.R, ly.L, ly.H
        ln = LayerName(ly.layer_name)
        q = (hidden @ ly.w_q).view(-1, H, P + R)
        kv_c, k_pe = (hidden @ ly.w_kv).split([L, R], dim=-1)
        kv_c = kv_c * torch.rsqrt(kv_c.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(kv_c.dtype)
        q[..., P:], k_rot = self.fn(positions, q[..., P:], k_pe.unsqueeze(1), self.cos_sin_cache, ly.is_neox)
        dep = standins.kv_cache_update(kv_c, k_rot, ln, ly.kv_cache_dtype, ly.k_scale)
        out = torch.empty((hidden.shape[0], H * ly.V), dtype=q.dtype)
        standins.attention_with_output(q, kv_c, k_rot, out, ln, kv_cache_dummy_dep=dep)
        return hidden + out @ ly.w_o, q[..., P:] * 1


@dataclass
class DecodeStack:
    """What :func:`build_decode_stack` returns."""

    module: MLADecodeStack
    states: dict
    hidden: int
    max_pos: int
    seed: int
    meta: dict = field(default_factory=dict)

    def make_inputs(self, T: int, *, seed: int | None = None, device="cpu"):
        g = torch.Generator().manual_seed(self.seed + 1000 + T if seed is None else seed)
        dtype = self.meta["dtype"]
        hidden = torch.randn(T, self.hidden, generator=g).to(dtype).to(device)
        positions = torch.randint(0, self.max_pos, (T,), generator=g).to(device)
        return positions, hidden

    def snapshot_caches(self) -> dict:
        return {name: s.kv_cache.clone() for name, s in self.states.items()}

    def restore_caches(self, snap: dict) -> None:
        for name, s in self.states.items():
            s.kv_cache.copy_(snap[name])

    def unregister(self) -> None:
        for name in self.states:
            local_layers.unregister(name)


def build_decode_stack(
    num_layers: int = 2,
    *,
    H: int = 16,
    P: int = 128,
    L: int = 512,
    R: int = 64,
    V: int = 128,
    hidden: int = 256,
    form: str = "raw",
    rope: str = "native",
    is_neox: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    kv_cache_dtype: str = "auto",
    q_fp8: bool = False,
    num_blocks: int = 8,
    block_size: int = 16,
    max_pos: int = 1024,
    cos_sin_dtype: torch.dtype | None = None,
    prefix: str = "model.layers",
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> DecodeStack:
    """A ``num_layers`` MLA decode stack with random weights and stand-in layers
    named ``f"{prefix}.{i}.self_attn.attn"`` (registered in ``local_layers``).

    DeepSeek-V3 dims are ``H=128, P=128, L=512, R=64, V=128`` (:data:`DSV3`);
    tests scale H and ``hidden`` down. ``cos_sin_dtype`` defaults to ``dtype``
    (vLLM casts its cos/sin cache to the model dtype).
    """
    if form not in ("raw", "fused_rope"):
        raise ValueError(f"build_decode_stack: argument 'form' must be 'raw' or 'fused_rope', got {form!r}")
    if rope not in ROPES:
        raise ValueError(f"build_decode_stack: argument 'rope' must be one of {sorted(ROPES)}, got {rope!r}")
    g = torch.Generator().manual_seed(seed)
    states, layers = {}, []
    for i in range(num_layers):
        name = f"{prefix}.{i}.self_attn.attn"
        state = standins.make_standin_layer(
            name, H=H, P=P, L=L, R=R, V=V, num_blocks=num_blocks, block_size=block_size, dtype=dtype,
            kv_cache_dtype=kv_cache_dtype, q_fp8=q_fp8, device=device, generator=g)
        states[name] = state
        layers.append(MLADecodeLayer(name, state, hidden=hidden, P=P, L=L, R=R, V=V, form=form, rope=rope,
                                     is_neox=is_neox, dtype=dtype, generator=g))
    cos_sin = make_cos_sin_cache(max_pos, R, dtype=cos_sin_dtype or dtype, device=device)
    module = MLADecodeStack(layers, cos_sin).to(device)
    return DecodeStack(module, states, hidden, max_pos, seed,
                       meta=dict(H=H, P=P, L=L, R=R, V=V, dtype=dtype, form=form, rope=rope, is_neox=is_neox,
                                 kv_cache_dtype=kv_cache_dtype, q_fp8=q_fp8, num_blocks=num_blocks,
                                 block_size=block_size))


def set_step(stack: DecodeStack, T: int, *, num_decode_tokens: int | None = None, pad_every: int = 3,
             seed: int = 0) -> None:
    """Give every layer a fresh slot mapping for ``T`` tokens (distinct slots,
    every ``pad_every``-th one -1) and the decode/prefill split."""
    g = torch.Generator().manual_seed(seed)
    for state in stack.states.values():
        n_slots = state.kv_cache.shape[0] * state.kv_cache.shape[1]
        if T > n_slots:
            raise ValueError(f"set_step: T={T} exceeds the {n_slots} cache slots")
        slots = torch.randperm(n_slots, generator=g)[:T]
        if pad_every:
            slots[::pad_every] = -1
        state.slot_mapping = slots.to(state.kv_cache.device)
        state.num_decode_tokens = num_decode_tokens
