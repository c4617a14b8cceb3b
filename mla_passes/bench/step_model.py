"""The model of ``mla-passes bench-step`` (:mod:`.step`): a stack of DeepSeek-V3
decoder layers at the dims of one tensor-parallel rank, as vLLM runs them for
decode, with our stand-ins for vLLM's cache-update and attention ops (vLLM's
schemas, given their roles so the passes match them) and the layer state the
attention op reads. What each layer does: :mod:`.step`'s docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

DSV3 = dict(hidden=7168, q_lora=1536, P=128, L=512, R=64, V=128)
SMOKE = dict(hidden=256, q_lora=128, P=128, L=512, R=64, V=128)
TP_OF_HEADS = {128: 1, 64: 2, 32: 4, 16: 8, 8: 16}
# DeepSeek-V3 MoE per token: 8 routed + 1 shared expert, intermediate 2048, fp8 weights
ACTIVE_EXPERTS, MOE_INTER, MOE_WEIGHT_BYTES = 9, 2048, 1


def mlp_stand_in_intermediate(H: int, model_bytes: int = 2) -> int:
    """Intermediate size of the dense bf16 gated MLP whose weight bytes equal
    DeepSeek-V3's active experts per token at the TP that gives H heads."""
    tp = TP_OF_HEADS.get(H, max(1, 128 // H))
    return ACTIVE_EXPERTS * MOE_INTER * MOE_WEIGHT_BYTES // (tp * model_bytes)


def num_kv_splits(max_seq_len: int, sm_count: int) -> int:
    """KV splits of the Triton MLA decode kernel, by vLLM's TRITON_MLA rule:
    a power of two of one split per 512 tokens, capped at 2 per SM."""
    ideal = 1 << max(0, (max(1, max_seq_len // 512) - 1).bit_length())
    return min(ideal, 2 * sm_count)


# ------------------------------------------------------------------ ops

_OPS = {}


def _ops():
    """Our stand-ins for vLLM's cache-update and attention ops (vLLM's schemas),
    registered once and given their roles so the passes match them."""
    if _OPS:
        return _OPS
    from mla_passes import op_handles
    from mla_passes.layers import resolve_layer
    from mla_passes.ops import LAYER_NAME_TYPE as LN, define_op
    from mla_passes.vllm import tables as vllm_tables

    lib = torch.library.Library("mla_passes_bench_step", "DEF")

    def cache_update(kv_c_normed, k_pe, layer_name, kv_cache_dtype, k_scale):
        resolve_layer(layer_name).write_cache(kv_c_normed, k_pe, kv_cache_dtype, k_scale)
        return torch.empty(0, device=kv_c_normed.device, dtype=kv_c_normed.dtype)

    def cache_update_fake(kv_c_normed, k_pe, layer_name, kv_cache_dtype, k_scale):
        return torch.empty(0, device=kv_c_normed.device, dtype=kv_c_normed.dtype)

    def attention(q, kv_c_normed, k_pe, output, layer_name, output_scale=None, output_block_scale=None,
                  kv_cache_dummy_dep=None, quant_group_size=None, quant_scale_ue8m0=None, quant_col_major=None,
                  quant_tma_aligned=None, q_dcp_replicated=None):
        state = resolve_layer(layer_name)
        state.attend(state.decode_q_prep(q), output)

    def attention_fake(q, kv_c_normed, k_pe, output, layer_name, *args, **kwargs):
        return None

    _OPS["lib"] = lib
    schemas = vllm_tables.V0_32  # the release the stand-in stack mirrors
    _OPS["kv_cache_update"] = define_op(
        lib, schemas.ops["kv_cache_update"], schemas.schema("kv_cache_update", LN),
        mutates=(), impl=cache_update, fake=cache_update_fake)
    _OPS["attention"] = define_op(
        lib, schemas.ops["attention"], schemas.schema("attention", LN),
        mutates=("output", "output_block_scale"), impl=attention, fake=attention_fake)
    op_handles.register_role("kv_cache_update", _OPS["kv_cache_update"])
    op_handles.register_role("attention", _OPS["attention"])
    return _OPS


def _cat_quant_kernel():
    """One Triton kernel for concat + static fp8 quant of q (what vLLM's
    ``_decode_concat_quant_fp8_op`` does in one kernel), built on first use."""
    if "cat_quant" in _OPS:
        return _OPS["cat_quant"]
    import triton
    import triton.language as tl

    @triton.jit
    def cat_quant(ql_ptr, qpe_ptr, out_ptr, scale_ptr, H, s_lt, s_lh, s_pt, s_ph, s_ot, s_oh,
                  L: tl.constexpr, R: tl.constexpr, FP8_MAX: tl.constexpr):
        row = tl.program_id(0)
        t = row // H
        h = row - t * H
        inv = 1.0 / tl.load(scale_ptr)
        offs = tl.arange(0, L)
        x = tl.load(ql_ptr + t * s_lt + h * s_lh + offs).to(tl.float32) * inv
        x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
        tl.store(out_ptr + t * s_ot + h * s_oh + offs, x.to(out_ptr.dtype.element_ty))
        offs_r = tl.arange(0, R)
        y = tl.load(qpe_ptr + t * s_pt + h * s_ph + offs_r).to(tl.float32) * inv
        y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
        tl.store(out_ptr + t * s_ot + h * s_oh + L + offs_r, y.to(out_ptr.dtype.element_ty))

    _OPS["cat_quant"] = cat_quant
    return cat_quant


# ------------------------------------------------------------------ layer state

def _mla_state_cls():
    from mla_passes.layers import MLALayerState

    @dataclass
    class StepLayer(MLALayerState):
        """One layer's attention state: the paged fp8 cache, the per-step block
        table / sequence lengths / slots, W_UV, and which attention runs."""

        w_uv: torch.Tensor | None = None
        block_table: torch.Tensor | None = None
        seq_lens: torch.Tensor | None = None
        softmax_scale: float = 1.0
        kv_splits: int = 1
        attn_impl: str = "torch"      # "vllm-triton" or "torch" (smoke only)
        attn_fn: object = None

        def __post_init__(self) -> None:
            super().__post_init__()
            self.attention_with_prepped_q = lambda q, q_prepped, kv_c, k_pe, output: self.attend(q_prepped, output)

        # the cache write op of the unfused graph (vLLM: concat_and_cache_mla, one kernel)
        def write_cache(self, kv_c, k_pe, kv_cache_dtype, k_scale) -> None:
            T = kv_c.shape[0]
            if kv_c.is_cuda:
                from mla_passes.kernels.triton_prep import concat_and_cache_mla_triton

                concat_and_cache_mla_triton(kv_c, k_pe.reshape(T, -1), self.kv_cache, self.slot_mapping,
                                            kv_cache_dtype, k_scale)
            else:
                from mla_passes.testing.standins import write_cache

                write_cache(self, kv_c, k_pe, kv_cache_dtype, k_scale)

        # what vLLM's attention op does to decode rows before forward_mqa (passes off)
        def decode_q_prep(self, q: torch.Tensor) -> torch.Tensor:
            self.opaque_prep_calls = getattr(self, "opaque_prep_calls", 0) + 1  # host side: counts captures/calls
            T, H, _ = q.shape
            _, P, L = self.w_uk_t.shape
            ql = q.new_empty((T, H, L))
            torch.bmm(q[..., :P].transpose(0, 1), self.w_uk_t, out=ql.transpose(0, 1))
            q_pe = q[..., P:]
            if self.q_scale is None:
                return torch.cat((ql, q_pe), dim=-1)
            out = torch.empty((T, H, L + q_pe.shape[-1]), dtype=self.q_out_dtype(q.dtype), device=q.device)
            if q.is_cuda:
                from mla_passes.kernels.fp8 import fp8_max

                _cat_quant_kernel()[(T * H,)](
                    ql, q_pe, out, self.q_scale, H, ql.stride(0), ql.stride(1), q_pe.stride(0), q_pe.stride(1),
                    out.stride(0), out.stride(1), L=L, R=q_pe.shape[-1], FP8_MAX=fp8_max(out.dtype))
            else:
                from mla_passes.kernels.reference import finish_q

                finish_q(torch.cat((ql.float(), q_pe.float()), dim=-1), self.q_scale, out)
            return out

        def attend(self, q_prepped: torch.Tensor, output: torch.Tensor) -> None:
            """Latent MQA over the paged cache for every row, then W_UV -> output [T, H*V]."""
            T, H, D = q_prepped.shape
            L = self.w_uk_t.shape[-1]
            scale = self.softmax_scale
            qp = q_prepped
            if self.q_scale is not None:
                scale = scale * self.q_scale_value  # fp8 q: scores carry the q scale
            o = torch.empty((T, H, L), dtype=self.w_uv.dtype, device=qp.device)
            if self.attn_impl == "vllm-triton":
                from mla_passes.kernels.fp8 import as_fp8_cache

                cache = (as_fp8_cache(self.kv_cache) if self.kv_cache.dtype == torch.uint8 else self.kv_cache)
                k_buf = cache.unsqueeze(2)              # [blocks, block_size, 1, L+R]
                lse = torch.empty((T, H), dtype=torch.float32, device=qp.device)
                logits = torch.empty((T, H, self.kv_splits, L + 1), dtype=torch.float32, device=qp.device)
                self.attn_fn(qp, k_buf, k_buf[..., :L], o, lse, self.block_table[:T], self.seq_lens[:T], logits,
                             self.kv_splits, scale, cache.shape[1], k_scale=self.k_scale, v_scale=self.k_scale,
                             is_mla=True)
            else:  # torch math over the same pages: the smoke run's stand-in, not a production kernel
                from mla_passes.kernels import gather_cache_rows

                bs = self.kv_cache.shape[1]
                n = int(self.seq_lens[:T].max())
                j = torch.arange(n, device=qp.device)
                slots = self.block_table[:T, j // bs].long() * bs + (j % bs)
                rows = gather_cache_rows(self.kv_cache, slots.reshape(-1), self.kv_cache_dtype, self.k_scale,
                                         dtype=torch.float32).view(T, n, D)
                s = torch.einsum("thd,tnd->thn", qp.float(), rows) * scale
                s = s.masked_fill((j[None, :] >= self.seq_lens[:T, None])[:, None, :], float("-inf"))
                o.copy_(torch.einsum("thn,tnl->thl", torch.softmax(s, dim=-1), rows[..., :L]))
            V = self.w_uv.shape[-1]
            out = torch.bmm(o.transpose(0, 1), self.w_uv)  # [H, T, V]
            output.view(T, H, V).copy_(out.transpose(0, 1))

    return StepLayer


# ------------------------------------------------------------------ model

def _rms(x, w, eps=1e-6):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


class DecoderLayer(nn.Module):
    """One DeepSeek-V3 decoder layer at one rank's dims (dense MLP stand-in)."""

    def __init__(self, name, *, H, dims, inter, kv_cache_dtype, k_scale, dtype, device, g):
        super().__init__()
        self.name, self.H, self.kv_cache_dtype = name, H, kv_cache_dtype
        d = dims
        self.hidden, self.q_lora, self.P, self.L, self.R, self.V = (d["hidden"], d["q_lora"], d["P"], d["L"], d["R"],
                                                                      d["V"])

        def w(*shape):
            return nn.Parameter((torch.randn(*shape, generator=g, device=device) / math.sqrt(shape[0])).to(dtype),
                                requires_grad=False)

        def norm(n):
            return nn.Parameter((1 + 0.1 * torch.randn(n, generator=g, device=device)).to(dtype), requires_grad=False)

        self.in_norm, self.q_norm, self.kv_norm, self.post_norm = (norm(self.hidden), norm(self.q_lora),
                                                                   norm(self.L), norm(self.hidden))
        self.w_qkv_a = w(self.hidden, self.q_lora + self.L + self.R)
        self.w_q_b = w(self.q_lora, H * (self.P + self.R))
        self.w_o = w(H * self.V, self.hidden)
        self.w_gate_up = w(self.hidden, 2 * inter)
        self.w_down = w(inter, self.hidden)
        self.register_buffer("k_scale", k_scale)

    def forward(self, positions, hidden, cos_sin_cache):
        from mla_passes.ops import LayerName
        from mla_passes.testing.models import ROPES

        ops = _ops()
        T = hidden.shape[0]
        ln = LayerName(self.name)
        x = _rms(hidden, self.in_norm)
        q_c, kv_lora = (x @ self.w_qkv_a).split([self.q_lora, self.L + self.R], dim=-1)
        q = (_rms(q_c, self.q_norm) @ self.w_q_b).view(T, self.H, self.P + self.R)
        kv_c, k_pe = kv_lora.split([self.L, self.R], dim=-1)
        kv_c_normed = _rms(kv_c, self.kv_norm)
        k_pe = k_pe.unsqueeze(1)
        # GPT-J RoPE as vLLM's RotaryEmbedding.forward_native writes it (DeepSeek: is_neox_style=False)
        q[..., self.P:], k_pe = ROPES["native"](positions, q[..., self.P:], k_pe, cos_sin_cache, False)
        dep = ops["kv_cache_update"](kv_c_normed, k_pe, ln, self.kv_cache_dtype, self.k_scale)
        attn = torch.empty((T, self.H * self.V), dtype=q.dtype, device=q.device)
        ops["attention"](q, kv_c_normed, k_pe, attn, ln, kv_cache_dummy_dep=dep)
        h = hidden + attn @ self.w_o
        gate, up = (_rms(h, self.post_norm) @ self.w_gate_up).chunk(2, dim=-1)
        return h + (torch.nn.functional.silu(gate) * up) @ self.w_down


class StepModel:
    """The stack, its layer states (registered by name) and the paged caches,
    sized for the largest context and token count asked for."""

    def __init__(self, H, args, dims, device, attn_impl, attn_fn, seed=0):
        from mla_passes.kernels.fp8 import platform_fp8_dtype
        from mla_passes.layers import local_layers
        from mla_passes.testing.cases import make_cos_sin_cache
        from mla_passes.testing.models import MLADecodeStack  # layers in order, one shared cos/sin cache

        StepLayer = _mla_state_cls()
        self.H, self.dims, self.device = H, dims, device
        self.dtype = torch.bfloat16
        self.fp8 = platform_fp8_dtype(device)
        self.bs = args.block_size
        self.max_T, self.max_ctx = max(args.tokens), max(args.context)
        self.blocks_per_seq = -(-self.max_ctx // self.bs)
        num_blocks = self.max_T * self.blocks_per_seq + 1
        g = torch.Generator(device=device).manual_seed(seed)
        P, L, R, V = dims["P"], dims["L"], dims["R"], dims["V"]
        self.inter = mlp_stand_in_intermediate(H) if not args.smoke else 64
        self.q_fp8 = args.attn_q == "fp8"
        layers, self.states = [], {}
        for i in range(args.layers):
            name = f"model.layers.{i}.self_attn.attn"
            k_scale = torch.tensor([0.02], dtype=torch.float32, device=device)
            cache = torch.empty((num_blocks, self.bs, L + R), dtype=torch.uint8, device=device)
            for b0 in range(0, num_blocks, 1024):  # random rows (~N(0,1) after dequant), never zeros
                chunk = cache[b0:b0 + 1024]
                chunk.copy_((torch.randn(chunk.shape, generator=g, device=device, dtype=self.dtype) / 0.02)
                            .to(self.fp8).view(torch.uint8))
            q_scale = torch.tensor([0.02], dtype=torch.float32, device=device) if self.q_fp8 else None
            st = StepLayer(
                w_uk_t=(torch.randn(H, P, L, generator=g, device=device) / math.sqrt(P)).to(self.dtype),
                kv_cache=cache, slot_mapping=torch.zeros(0, dtype=torch.int64, device=device),
                kv_cache_dtype="fp8", k_scale=k_scale, q_scale=q_scale, q_fp8_dtype=self.fp8 if self.q_fp8 else None,
                w_uv=(torch.randn(H, L, V, generator=g, device=device) / math.sqrt(L)).to(self.dtype),
                softmax_scale=1.0 / math.sqrt(P + R), attn_impl=attn_impl, attn_fn=attn_fn)
            st.q_scale_value = float(q_scale.item()) if q_scale is not None else 1.0
            local_layers.register(name, st)
            self.states[name] = st
            layers.append(DecoderLayer(name, H=H, dims=dims, inter=self.inter, kv_cache_dtype="fp8", k_scale=k_scale,
                                       dtype=self.dtype, device=device, g=g))
        self.max_pos = self.max_ctx + 16
        cos_sin = make_cos_sin_cache(self.max_pos, R, dtype=self.dtype, device=device)
        self.module = MLADecodeStack(layers, cos_sin).eval()
        # one block table for every layer (as vLLM shares it): each sequence its own random blocks
        perm = torch.randperm(num_blocks - 1, generator=g, device=device)[: self.max_T * self.blocks_per_seq]
        self.block_table = perm.view(self.max_T, self.blocks_per_seq).to(torch.int32)
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1

    def set_step(self, T: int, ctx: int):
        """Sequences of ``ctx - (i % 4)`` tokens each (the new one included);
        token i is the newest of sequence i: its slot and position."""
        i = torch.arange(T, device=self.device)
        seq_lens = (ctx - (i % 4)).to(torch.int32)
        last = seq_lens.long() - 1
        slots = self.block_table[i, last // self.bs].long() * self.bs + last % self.bs
        for st in self.states.values():
            st.block_table, st.seq_lens, st.slot_mapping = self.block_table, seq_lens, slots
            st.kv_splits = num_kv_splits(ctx, self.sms)
        return last  # positions

    def inputs(self, T: int, ctx: int, seed: int):
        positions = self.set_step(T, ctx)
        g = torch.Generator(device=self.device).manual_seed(seed)
        hidden = torch.randn(T, self.dims["hidden"], generator=g, device=self.device).to(self.dtype)
        return positions, hidden

    def unregister(self):
        from mla_passes.layers import local_layers

        for name in self.states:
            local_layers.unregister(name)
