"""``mla-passes bench-step`` (``python -m mla_passes.bench.step``): what a decode step gains.

The kernel bench (:mod:`mla_passes.bench.kernel`) times the fused decode prep alone. This
tool times what a user turns the flag on for: a decode step of a stack of
DeepSeek-V3 decoder layers at the dims of one tensor-parallel rank (hidden
7168, q_lora 1536, kv_lora 512, qk_nope 128, qk_rope 64, v 128; H heads per
rank: 128 at TP 1, 16 at TP 8, 8 at TP 16), compiled by torch.compile
(Inductor) and replayed as a CUDA graph, with the passes off and on, on the
same inputs and the same cache.

Each layer, as vLLM runs it for decode:

* RMSNorm, the fused q_a/kv_a projection, RMSNorm of q_c, q_b; kv_c RMSNorm;
* GPT-J RoPE of q_pe and k_pe written the way vLLM's native rotary embedding
  writes it, the rotated q_pe assigned back into q;
* the cache update op (one Triton kernel, the stand-in for vLLM's
  ``concat_and_cache_mla``), fp8 cache;
* the attention op, opaque to torch.compile: inside it, as vLLM's
  ``MLAAttention.forward_impl`` does, the q-absorb (``torch.bmm`` into a
  token-major buffer), the concat + static fp8 quant of q (one kernel), then
  **vLLM's Triton MLA decode kernel** (``decode_attention_fwd`` from
  ``vllm/v1/attention/ops/triton_decode_attention.py``, loaded from a copy of
  vLLM's file by :mod:`tools.loaders.vllm_mla_stub`) over the paged fp8 cache, then
  the W_UV absorb (bmm);
* o_proj, the residual, RMSNorm and a dense gated MLP **stand-in** whose bf16
  weight bytes equal those of DeepSeek-V3's active experts per token at that
  TP (8 routed + 1 shared expert of intermediate 2048, fp8 weights; sharded
  over TP), so the step streams the weights a real MoE step streams for one
  token (a real MoE reads more as tokens pick different experts).

With the passes on, the fusion pass replaces RoPE + cache write + absorb +
concat + quant by our one fused op (Triton kernel) and the attention by the
prepped-q attention op, which runs the same attention kernel.

The attention takes an fp8 q (its ``tl.dot`` runs on the q dtype, fp8 x fp8,
with the q scale folded into the softmax scale). vLLM's own TRITON_MLA
backend feeds this kernel a bf16 q with an fp8 cache; ``--attn-q bf16``
measures that instead (then the prep has no q quant, and the fused op writes
bf16 q).

Reported per (H, context, T): us per layer-step off and on, saving in us and
%, the step's time with the prep removed from the "on" graph (so the prep's
in-step cost and share), that cost over the prep's bytes' time, and the
saving the kernel bench predicts (compile chain minus fused kernel, timed
alone in the same run) beside the measured one. ``--pdl`` also times the "on"
step with the fused kernel launched with programmatic dependent launch.

Correctness: before timing, both graphs run once from the same cache with the
rows they must write poisoned and the output poisoned; the stack output and
every written cache row of every layer are compared off vs on.

``--smoke`` runs the same code on tiny dims on CPU (no CUDA graph, the
attention in torch: labelled, not a measurement) so the tool is checked
before a GPU run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from unittest import mock

import torch
from torch import nn

from . import kernel as kernel_bench

HELP = "time a DeepSeek-V3 decode step (N layers, vLLM's Triton MLA attention) with the passes off and on"

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


# sizes where the option is not given: the GPU run's, and --smoke's
GPU_DEFAULTS = dict(tokens=[1, 8, 32, 64, 128, 256], context=[1024, 4096], layers=4)
SMOKE_DEFAULTS = dict(tokens=[1], context=[64], layers=2)
# sequence i of a step holds ctx - (i % 4) tokens (StepModel.set_step): at least 1 takes ctx >= 4
MIN_CONTEXT = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..diagnostics.argtypes import device, int_in, json_file, output_file, positive_int

    parser.add_argument("--heads", type=positive_int, nargs="+", default=[8, 16, 128])
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=None,
                        help=f"decode tokens per step (default {' '.join(map(str, GPU_DEFAULTS['tokens']))}; "
                             f"--smoke: {' '.join(map(str, SMOKE_DEFAULTS['tokens']))})")
    parser.add_argument("--context", type=int_in(MIN_CONTEXT), nargs="+", default=None,
                        help=f"tokens per sequence (default {' '.join(map(str, GPU_DEFAULTS['context']))}; "
                             f"--smoke: {' '.join(map(str, SMOKE_DEFAULTS['context']))})")
    parser.add_argument("--layers", type=positive_int, default=None,
                        help=f"decoder layers in the stack (default {GPU_DEFAULTS['layers']}; "
                             f"--smoke: {SMOKE_DEFAULTS['layers']})")
    parser.add_argument("--block-size", type=positive_int, default=64)
    parser.add_argument("--reps", type=positive_int, default=15, help="timed batches; the median is reported")
    parser.add_argument("--inner", type=positive_int, default=5, help="graph replays per timed batch")
    parser.add_argument("--attn-q", default="fp8", choices=("fp8", "bf16"),
                        help="q dtype the attention kernel takes (fp8: the prep quantizes q)")
    parser.add_argument("--pdl", action="store_true", help="also time the 'on' step with PDL launches (CUDA)")
    parser.add_argument("--predict-from", type=json_file, metavar="JSON",
                        help="a `mla-passes bench --json` file of this run for the predicted saving "
                             "(else the prep is timed alone here)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny dims on CPU (torch attention, no CUDA graph): checks the tool, not a measurement")
    parser.add_argument("--device", type=device, default=None, help="cuda, cuda:N or cpu (default cuda; --smoke: cpu)")
    parser.add_argument("--json", type=output_file, metavar="PATH")
    parser.add_argument("--plot", type=output_file, metavar="PNG")


def _check_args(args) -> int | None:
    """The rules between options (each value alone was checked when parsed); the exit status of a usage error."""
    from ..diagnostics.argtypes import usage_error

    for name, value in (SMOKE_DEFAULTS if args.smoke else GPU_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, list(value) if isinstance(value, list) else value)
    if args.device is None:
        args.device = "cpu" if args.smoke else "cuda"
    bad = kernel_bench.check_device("bench-step", args.device)
    if bad is not None:
        if not torch.cuda.is_available():
            print("mla-passes bench-step: use --smoke for the CPU check", file=sys.stderr)
        return bad
    if args.pdl and torch.device(args.device).type != "cuda":
        return usage_error("bench-step", "--pdl", f"PDL launches need a CUDA device, --device is {args.device}")
    if args.smoke:
        for option, given in (("--plot", args.plot), ("--predict-from", args.predict_from)):
            if given:
                return usage_error("bench-step", option, "--smoke measures nothing to plot or predict")
    return None


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
    _OPS["kv_cache_update"] = define_op(
        lib, "unified_mla_kv_cache_update",
        f"(Tensor kv_c_normed, Tensor k_pe, {LN} layer_name, str kv_cache_dtype, Tensor k_scale) -> Tensor",
        mutates=(), impl=cache_update, fake=cache_update_fake)
    _OPS["attention"] = define_op(
        lib, "unified_mla_attention_with_output",
        f"(Tensor q, Tensor kv_c_normed, Tensor k_pe, Tensor(a3!) output, {LN} layer_name, "
        "Tensor? output_scale=None, Tensor(a6!)? output_block_scale=None, Tensor? kv_cache_dummy_dep=None, "
        "SymInt? quant_group_size=None, bool? quant_scale_ue8m0=None, bool? quant_col_major=None, "
        "bool? quant_tma_aligned=None, Tensor? q_dcp_replicated=None) -> ()",
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


# ------------------------------------------------------------------ compile, run, time

def _backend(pm):
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        # no compile caches: a cached graph would skip the passes, and their match counts with them
        patch = {"fx_graph_cache": False}
        if pm is not None:
            patch["post_grad_custom_post_pass"] = pm
        with torch._inductor.config.patch(patch), torch._functorch.config.patch(enable_autograd_cache=False):
            return compile_fx(gm, example_inputs)

    return backend


@contextlib.contextmanager
def _prep_removed():
    """The fused op's kernel launch left out (timing only: the step's time without the prep)."""
    from mla_passes.kernels import triton_prep

    saved = triton_prep.fused_decode_prep_triton
    triton_prep.fused_decode_prep_triton = lambda *a, **k: None
    try:
        yield
    finally:
        triton_prep.fused_decode_prep_triton = saved


class Captured:
    """``fn(positions, hidden)`` captured in a CUDA graph (or, on CPU, called)."""

    def __init__(self, fn, positions, hidden, ctx=contextlib.nullcontext):
        self.fn, self.positions, self.hidden = fn, positions, hidden
        self.cuda = hidden.is_cuda
        with ctx(), torch.no_grad():
            if not self.cuda:
                self.out = fn(positions, hidden)
                return
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    fn(positions, hidden)
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = fn(positions, hidden)
        torch.cuda.synchronize()

    def run(self):
        if self.cuda:
            self.graph.replay()
        else:
            with torch.no_grad():
                self.out = self.fn(self.positions, self.hidden)
        return self.out

    def time_us(self, reps, inner) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            for _ in range(inner):
                self.run()
            return (time.perf_counter() - t0) * 1e6 / inner
        for _ in range(3):
            self.graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                self.graph.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / inner)
        return statistics.median(times)


def _written_rows(model, T):
    """Every layer's cache rows at this step's slots, dequantized: [layers, T, L+R]."""
    from mla_passes.kernels import gather_cache_rows

    rows = []
    for st in model.states.values():
        rows.append(gather_cache_rows(st.kv_cache, st.slot_mapping[:T], "fp8", st.k_scale, dtype=torch.float32))
    return torch.stack(rows)


def _poison(model, captured, T):
    for st in model.states.values():
        flat = st.kv_cache.view(-1, st.kv_cache.shape[-1])
        flat[st.slot_mapping[:T]] = 0x7F  # an fp8 e4m3fn NaN: a row the step does not write stays NaN
    if captured.out is not None:
        captured.out.fill_(float("nan"))


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def compare(model, off: Captured, on: Captured, T: int) -> dict:
    """Both graphs once from the same poisoned rows; output and written rows off vs on."""
    from mla_passes.testing import fp8_step

    _poison(model, off, T)
    out_off = off.run().clone()
    rows_off = _written_rows(model, T)
    _poison(model, on, T)
    out_on = on.run().clone()
    rows_on = _written_rows(model, T)
    if out_off.is_cuda:
        torch.cuda.synchronize()
    ks = next(iter(model.states.values())).k_scale.float()
    r0_off, r0_on = rows_off[0] / ks, rows_on[0] / ks
    steps0 = ((r0_on - r0_off).abs() / fp8_step(torch.maximum(r0_on.abs(), r0_off.abs()), model.fp8)).max()
    res = dict(
        output_rel_l2=_rel(out_on, out_off),
        cache_rel_l2=_rel(rows_on, rows_off),
        layer0_cache_max_fp8_steps=float(steps0),
        finite=bool(torch.isfinite(out_on).all() and torch.isfinite(out_off).all()
                    and torch.isfinite(rows_on).all() and torch.isfinite(rows_off).all()),
    )
    # layer 0 sees the same inputs both ways (one fp8 step); later layers inherit rounding differences
    res["ok"] = bool(res["finite"] and res["layer0_cache_max_fp8_steps"] <= 1.01  # one step, float slack
                     and res["cache_rel_l2"] < 0.05 and res["output_rel_l2"] < 0.05)
    return res




def _load_attention(device, smoke):
    if smoke or device.type != "cuda":
        return "torch", None
    # tools/ of a checkout (not installed): the loader reads vLLM's kernel file from its .whl/
    from tools.loaders.vllm_mla_stub import load_decode_attention_fwd

    return "vllm-triton", load_decode_attention_fwd()


def _predictions(args, heads, tokens, device, bw):
    """Kernel-bench numbers for the step's shapes: fused and compile chain (us per layer)."""
    out = {}
    if args.predict_from:  # an existing JSON object (checked when parsed)
        with open(args.predict_from) as f:
            data = json.load(f)
        for title, rows in data.get("tables", {}).items():
            want = "fp8 cache + fp8 q" if args.attn_q == "fp8" else "fp8 cache + bf16 q"
            if not title.endswith(want) or "gptj" not in title:
                continue
            for r in rows:
                out[(r["H"], r["T"])] = dict(fused_us=r.get("fused_us"), compile_us=r.get("compile_us"),
                                             source=args.predict_from)
    missing = [(H, T) for H in heads for T in tokens if (H, T) not in out]
    if missing and device.type == "cuda":
        bench = kernel_bench

        ns = argparse.Namespace(dtype="bfloat16", block_size=args.block_size, pad_every=0, layers=8)
        case = "fp8" if args.attn_q == "fp8" else "fp8kv"
        variants = bench._variants(["fused", "compile"], False, device, case)
        for H, T in missing:
            layers = [bench.Layer(T, H, ns, seed=1000 * i + T + H, device=device, case=case) for i in range(8)]
            out[(H, T)] = dict(source="timed here (8 layers per graph)",
                               **{f"{n}_us": bench._time_graph(fn, layers, 15, 10) for n, fn in variants.items()})
            del layers
    return out


def probe_attention(attn_fn, device, q_fp8: bool, H: int = 16, seed: int = 0) -> float:
    """vLLM's kernel through :meth:`StepLayer.attend` against the torch math on the
    same paged fp8 cache (ragged lengths, shuffled blocks): relative L2 error."""
    from mla_passes.kernels.fp8 import platform_fp8_dtype, quantize_fp8

    StepLayer = _mla_state_cls()
    g = torch.Generator(device=device).manual_seed(seed)
    T, P, L, R, V, bs, nb = 3, 128, 512, 64, 128, 64, 12
    fp8 = platform_fp8_dtype(device)
    k_scale = torch.tensor([0.02], device=device)
    cache = quantize_fp8(torch.randn(nb, bs, L + R, generator=g, device=device), k_scale, fp8).view(torch.uint8)
    q_scale = torch.tensor([0.02], device=device) if q_fp8 else None
    q = torch.randn(T, H, L + R, generator=g, device=device)
    qp = quantize_fp8(q, q_scale, fp8) if q_fp8 else q.to(torch.bfloat16)
    w_uv = (torch.randn(H, L, V, generator=g, device=device) / math.sqrt(L)).to(torch.bfloat16)
    block_table = torch.randperm(nb, generator=g, device=device)[: T * 4].view(T, 4).to(torch.int32)
    outs = []
    for impl in ("vllm-triton", "torch"):
        st = StepLayer(w_uk_t=torch.zeros(H, P, L, dtype=torch.bfloat16, device=device), kv_cache=cache,
                       slot_mapping=torch.zeros(0, dtype=torch.int64, device=device), kv_cache_dtype="fp8",
                       k_scale=k_scale, q_scale=q_scale, q_fp8_dtype=fp8 if q_fp8 else None, w_uv=w_uv,
                       softmax_scale=1.0 / math.sqrt(P + R), attn_impl=impl, attn_fn=attn_fn)
        st.q_scale_value = float(q_scale.item()) if q_fp8 else 1.0
        st.block_table, st.kv_splits = block_table, 2
        st.seq_lens = torch.tensor([200, 77, 256], dtype=torch.int32, device=device)
        out = torch.empty(T, H * V, dtype=torch.bfloat16, device=device)
        st.attend(qp, out)
        outs.append(out.float())
    return _rel(outs[0], outs[1])


def run(args) -> int:
    bad = _check_args(args)
    if bad is not None:
        return bad
    smoke = args.smoke
    device = torch.device(args.device)
    dims = SMOKE if smoke else DSV3
    if smoke:
        print("[smoke] tiny dims on CPU, torch attention, no CUDA graph: checks the tool, NOT a measurement")
    torch._dynamo.config.cache_size_limit = 512
    torch._dynamo.config.recompile_limit = 512
    os.environ.setdefault("MLA_PASSES_STRICT", "1")

    from mla_passes import MLAPassManager, PassConfig

    bench = kernel_bench
    _ops()
    attn_impl, attn_fn = _load_attention(device, smoke)
    if attn_fn is not None:  # the kernel as we call it, against torch math on the same pages
        for qf in ((True, False) if args.attn_q == "fp8" else (False,)):
            try:
                err = probe_attention(attn_fn, device, qf)
                print(f"attention check (vLLM kernel vs torch math, {'fp8' if qf else 'bf16'} q): rel L2 {err:.2e}")
            except Exception as e:  # noqa: BLE001
                err = float("inf")
                print(f"attention check ({'fp8' if qf else 'bf16'} q) failed: {type(e).__name__}: {e}"[:400])
            # fp8 q: the kernel also rounds k*k_scale and the softmax weights to fp8 for its fp8 dots
            # (3 mantissa bits): a few % of relative error is that precision, not a wrong call
            if not err < (0.1 if qf else 0.02):
                print("the attention check failed: the step's numbers use a kernel called wrongly", file=sys.stderr)
                return 1
    bw = bench._copy_bandwidth(device) if device.type == "cuda" else float("nan")
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, layers=args.layers, dims=dims, attention=attn_impl, attn_q=args.attn_q,
                block_size=args.block_size, copy_bandwidth_TBps=bw / 1e12, smoke=smoke,
                mlp="dense gated bf16 stand-in, weight bytes = DeepSeek-V3's 9 active fp8 experts (2048) / TP")
    print(f"device: {meta['device']}, torch {torch.__version__}; {args.layers} DeepSeek-V3 layers per step, "
          f"attention: {attn_impl} ({'vLLM triton_decode_attention.decode_attention_fwd' if attn_fn else 'torch math'}), "
          f"q into attention: {args.attn_q}, fp8 cache, block size {args.block_size}")
    print("MLP: a dense bf16 STAND-IN whose weight bytes equal DeepSeek-V3's active experts per token at that TP")
    predictions = _predictions(args, args.heads, args.tokens, device, bw) if not smoke else {}

    rows = []
    for H in args.heads:
        torch._dynamo.reset()
        t0 = time.time()
        model = StepModel(H, args, dims, device, attn_impl, attn_fn, seed=H)
        pm = MLAPassManager(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True, no_range_policy="apply"),
                            max_num_seqs=max(args.tokens))
        off_fn = torch.compile(model.module, backend=_backend(None), fullgraph=True)
        on_fn = torch.compile(model.module, backend=_backend(pm), fullgraph=True)
        print(f"[step] H={H}: MLP stand-in intermediate {model.inter}; built in {time.time() - t0:.1f}s",
              file=sys.stderr, flush=True)
        for T in args.tokens:
            for ctx in args.context:
                t1 = time.time()
                positions, hidden = model.inputs(T, ctx, seed=7 * T + ctx)
                if T > 1:
                    torch._dynamo.mark_dynamic(hidden, 0)
                    torch._dynamo.mark_dynamic(positions, 0)
                row = dict(H=H, T=T, context=ctx, tp=TP_OF_HEADS.get(H), kv_splits=num_kv_splits(ctx, model.sms))
                try:
                    calls = lambda: sum(getattr(st, "opaque_prep_calls", 0) for st in model.states.values())  # noqa: E731
                    c0 = calls()
                    off = Captured(off_fn, positions, hidden)
                    c1 = calls()
                    on = Captured(on_fn, positions, hidden)
                    row["opaque_prep_calls"] = dict(off=c1 - c0, on=calls() - c1)
                    row["fused_layers"] = pm.matched_counts.get("mla_qk_rope_kvcache_fusion", 0)
                    row["check"] = compare(model, off, on, T)
                    # off == on proves nothing unless the fusion really replaced every layer's prep
                    row["check"]["ok"] = (row["check"]["ok"] and row["fused_layers"] == args.layers
                                          and row["opaque_prep_calls"]["off"] > 0 and row["opaque_prep_calls"]["on"] == 0)
                    row["off_us"] = off.time_us(args.reps, args.inner) / args.layers
                    row["on_us"] = on.time_us(args.reps, args.inner) / args.layers
                    del off
                    noprep = Captured(on_fn, positions, hidden, ctx=_prep_removed)
                    row["noprep_us"] = noprep.time_us(args.reps, args.inner) / args.layers
                    del noprep
                    if args.pdl and device.type == "cuda":
                        try:
                            pdl = Captured(on_fn, positions, hidden, ctx=lambda: mock.patch.dict(os.environ, MLA_PASSES_PDL="1"))
                            row["check_pdl"] = compare(model, on, pdl, T)  # PDL vs plain launch, same graph
                            row["on_pdl_us"] = pdl.time_us(args.reps, args.inner) / args.layers
                            del pdl
                        except Exception as e:  # noqa: BLE001
                            row["pdl_error"] = f"{type(e).__name__}: {e}"[:400]
                            print(f"[step] PDL H={H} T={T} ctx={ctx} failed: {row['pdl_error']}", file=sys.stderr)
                    del on
                except Exception as e:  # noqa: BLE001 - one failing shape must not hide the others
                    row["error"] = f"{type(e).__name__}: {e}"[:400]
                    print(f"[step] H={H} T={T} ctx={ctx} failed: {row['error']}", file=sys.stderr, flush=True)
                nbytes = bench.min_bytes(T, H, q_out_bytes=1 if model.q_fp8 else 2, cache_bytes=1)
                row["prep_bytes_us"] = nbytes / bw * 1e6 if device.type == "cuda" else None
                row.update({f"pred_{k}": v for k, v in predictions.get((H, T), {}).items()})
                rows.append(row)
                print("[row] " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
                print(f"[step] H={H} T={T} ctx={ctx} done in {time.time() - t1:.1f}s", file=sys.stderr, flush=True)
        model.unregister()
        del model, off_fn, on_fn
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    summary = print_table(rows, smoke, args.pdl)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, summary=summary), f, indent=1, default=str)
    if args.plot and not smoke:
        try:
            write_plot(args.plot, rows, meta)
        except ImportError as e:
            print(f"[step] no plot: {e}", file=sys.stderr)
    bad = [r for r in rows if "error" in r or not r.get("check", {}).get("ok", False)
           or ("check_pdl" in r and not r["check_pdl"]["ok"])]
    if bad:
        print(f"[step] {len(bad)}/{len(rows)} shapes failed or did not match off vs on: "
              + "; ".join(f"H={r['H']} T={r['T']} ctx={r['context']}" for r in bad), file=sys.stderr)
    return 1 if bad else 0


def _f(x, spec="7.2f"):
    return format(x, spec) if isinstance(x, (int, float)) and x is not None and math.isfinite(x) else f"{'-':>7}"


def derived(r: dict) -> dict:
    """Saving, prep share, in-step prep cost and its ratio to the bytes' time, prediction."""
    d = {}
    off, on, nop = r.get("off_us"), r.get("on_us"), r.get("noprep_us")
    if off and on:
        d["saving_us"] = off - on
        d["saving_pct"] = 100 * (off - on) / off
    if on and nop is not None:
        d["prep_in_step_us"] = on - nop
        d["prep_share_on_pct"] = 100 * (on - nop) / on
        if off:
            d["chain_in_step_us"] = off - nop  # the unfused chain inside the off step (same noprep rest)
            d["prep_share_off_pct"] = 100 * (off - nop) / off
        if r.get("prep_bytes_us"):
            d["prep_over_bytes"] = (on - nop) / r["prep_bytes_us"]
    pf, pc = r.get("pred_fused_us"), r.get("pred_compile_us")
    if pf and pc:
        d["pred_saving_us"] = pc - pf
    if r.get("on_pdl_us") and on:
        d["pdl_gain_us"] = on - r["on_pdl_us"]
    return d


def print_table(rows, smoke, pdl) -> dict:
    label = " [SMOKE: CPU, torch attention, not a measurement]" if smoke else ""
    print(f"\n## decode step, us per layer (stack time / layers){label}")
    cols = ["H", "ctx", "T", "off", "on", "saving", "save%", "pred", "noprep", "chain_in", "pr_chain", "prep_in",
            "pr_fused", "share%", "x_bytes"]
    if pdl:
        cols += ["on_pdl", "pdl_gain"]
    cols += ["match"]
    print(" ".join(f"{c:>7}" for c in cols))
    for r in rows:
        d = derived(r)
        r.update(d)
        vals = [f"{r['H']:>7}", f"{r['context']:>7}", f"{r['T']:>7}", _f(r.get("off_us")), _f(r.get("on_us")),
                _f(d.get("saving_us")), _f(d.get("saving_pct"), "7.1f"), _f(d.get("pred_saving_us")),
                _f(r.get("noprep_us")), _f(d.get("chain_in_step_us")), _f(r.get("pred_compile_us")),
                _f(d.get("prep_in_step_us")), _f(r.get("pred_fused_us")), _f(d.get("prep_share_on_pct"), "7.1f"),
                _f(d.get("prep_over_bytes"))]
        if pdl:
            vals += [_f(r.get("on_pdl_us")), _f(d.get("pdl_gain_us"))]
        c = r.get("check")
        vals += [f"{'ok' if c and c['ok'] else ('ERR' if 'error' in r else 'DIFF'):>7}"]
        print(" ".join(vals))
    print("off/on: passes off/on; saving = off - on; pred = the kernel bench's saving at that (H, T) "
          "(compile chain - fused kernel, each timed alone); noprep = the 'on' step with the fused kernel "
          "left out; chain_in = off - noprep (the unfused chain inside the step; pr_chain: the kernel bench's "
          "compile chain alone); prep_in = on - noprep (the fused prep inside the step; pr_fused: alone), "
          "share% of the on step; "
          "x_bytes = prep_in / (prep bytes / copy bandwidth)")
    timed = [r for r in rows if "prep_over_bytes" in r]
    over = [r for r in timed if r["prep_over_bytes"] > 1.5]
    summary = dict(shapes=len(rows), matched=sum(1 for r in rows if r.get("check", {}).get("ok")))
    if timed:
        worst = max(timed, key=lambda r: r["prep_over_bytes"])
        summary.update(worst_prep_over_bytes=worst["prep_over_bytes"], target_prep_1_5x_bytes=not over)
        gap = "met" if not over else (f"MISSED at {len(over)}/{len(timed)} shapes, worst by "
                                      f"{worst['prep_over_bytes'] / 1.5:.2f}x (H={worst['H']} T={worst['T']} "
                                      f"ctx={worst['context']})")
        print(f"in-step fused prep / its bytes' time: worst {worst['prep_over_bytes']:.2f}x (target <= 1.5x: {gap})")
    pairs = [r for r in rows if "pred_saving_us" in r and "saving_us" in r]
    if pairs:
        ratio = statistics.median(r["saving_us"] / r["pred_saving_us"] for r in pairs if r["pred_saving_us"] > 0)
        summary["median_measured_over_predicted_saving"] = ratio
        print(f"measured / predicted saving: median {ratio:.2f} over {len(pairs)} shapes")
    print(f"off vs on outputs and caches match at {summary['matched']}/{len(rows)} shapes")
    return summary


def write_plot(path, rows, meta) -> None:
    """Step time per layer against T, passes off vs on, one panel per H (both contexts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = sorted({r["H"] for r in rows})
    fig, axes = plt.subplots(1, len(heads), figsize=(4.4 * len(heads), 3.6), squeeze=False)
    for j, H in enumerate(heads):
        ax = axes[0][j]
        for k, ctx in enumerate(sorted({r["context"] for r in rows})):
            rs = sorted((r for r in rows if r["H"] == H and r["context"] == ctx and r.get("on_us")),
                        key=lambda r: r["T"])
            if not rs:
                continue
            ts = [r["T"] for r in rs]
            ax.plot(ts, [r["off_us"] for r in rs], color=f"C{2 * k + 1}", marker="s", ls="--",
                    label=f"passes off, ctx {ctx}")
            ax.plot(ts, [r["on_us"] for r in rs], color=f"C{2 * k}", marker="o", ls="-",
                    label=f"passes on, ctx {ctx}")
        ax.set_xscale("log", base=2)
        ax.set_title(f"H={H} (TP {TP_OF_HEADS.get(H)})", fontsize=9)
        ax.set_xlabel("tokens T (decode sequences)")
        ax.set_ylabel("us per layer-step")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"DeepSeek-V3 decode step, {meta['layers']} layers, {meta['device']} (CUDA-graph replay; "
                 f"vLLM Triton MLA attention, fp8 cache + fp8 q; MLP: dense stand-in)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mla-passes bench-step", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
