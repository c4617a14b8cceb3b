"""Stand-ins for vLLM's MLA ops, for graphs built without vLLM.

The passes match vLLM's KV-cache update, MLA attention and fused RoPE +
cache update ops (named, with their schemas, in
:mod:`mla_passes.vllm.tables`). Tests, the demo and the benchmarks need the
same graph forms (DESIGN §3) on a machine without vLLM, and need them to
compute real numbers, so this module defines ops with the same names and
schemas (vLLM 0.32/0.33, :data:`SCHEMAS_OF`) under the ``mla_passes_standin``
namespace.
Importing this module registers them and adds them to the roles of
:mod:`mla_passes.op_handles` (:func:`mla_passes.op_handles.register_role`), so
every pass matches them next to vLLM's own. Runtime code never imports it.

Semantics (reference math; layer state through :mod:`mla_passes.layers`):

* the KV-cache update writes ``[kv_c | k_pe]`` into the layer's
  cache at its slot mapping (``slot < 0`` skipped, fp8 caches as
  ``fp8(x / k_scale)``) and returns an empty dependency token.
* the fused RoPE + cache update rotates ``q_pe`` and ``k_pe`` in
  place and writes the cache like the op above.
* the attention does what vLLM's MLA attention does
  with a :class:`StandinMLALayer`: rows ``[:num_decode_tokens]`` get the
  decode q-prep (q-absorb, q-concat, q-quant) INSIDE the op, opaque to
  torch.compile, then attend over the layer's cache rows
  ``context_slots`` (latent MQA, then ``W_UV``); the remaining (prefill) rows
  run a causal MHA over their own ``kv_c``/``k_pe``. The output depends on q,
  on the cache and on the decode/prefill split.

A :class:`StandinMLALayer` registers ``attention_with_prepped_q`` so
``mla_passes::mla_attention_with_prepped_q`` runs the same attention with an
already prepped q for the decode rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import op_handles
from ..kernels import gather_cache_rows
from ..kernels.fp8 import as_fp8_cache, is_fp8_kv_cache, platform_fp8_dtype, quantize_fp8
from ..kernels.reference import absorb_q_nope, cos_sin_for, finish_q, rope_fp32
from ..layers import MLALayerState, layer_name_str, local_layers, resolve_layer
from ..ops import LAYER_NAME_TYPE as _LN, define_op
from ..vllm import tables as vllm_tables

NAMESPACE = "mla_passes_standin"
# The vLLM release whose op names and schemas the stand-ins copy (0.33's are the
# same; 0.34 appends one optional attention argument, mqa_q_prepared, which the
# passes refuse when set).
SCHEMAS_OF = vllm_tables.V0_32

@dataclass
class StandinMLALayer(MLALayerState):
    """Layer state of a stand-in MLA layer: :class:`MLALayerState` plus what
    the stand-in attention needs (``W_UV [H, L, V]``, the cache slots a decode
    token attends to, the softmax scale)."""

    w_uv: torch.Tensor | None = None
    context_slots: torch.Tensor | None = None
    softmax_scale: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention_with_prepped_q is None:
            self.attention_with_prepped_q = self._attention_with_prepped_q

    def _attention_with_prepped_q(self, q, q_prepped, kv_c_normed, k_pe, output) -> None:
        standin_attention(self, q, q_prepped, kv_c_normed, k_pe, output)


def _state(layer_name) -> MLALayerState:
    return resolve_layer(layer_name)


def write_cache(state: MLALayerState, kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache_dtype: str,
                k_scale: torch.Tensor) -> None:
    """``cache[slot_mapping[t]] = quant([kv_c[t] | k_pe[t]])`` where the slot is >= 0."""
    T = kv_c.shape[0]
    row = torch.cat((kv_c.float(), k_pe.reshape(T, -1).float()), dim=-1)
    slots = state.slot_mapping
    valid = slots >= 0
    flat = state.kv_cache.view(-1, state.kv_cache.shape[-1])
    idx = slots[valid].long()
    if is_fp8_kv_cache(kv_cache_dtype):
        flat = as_fp8_cache(flat)
        flat[idx] = quantize_fp8(row[valid], k_scale, flat.dtype)
    else:
        flat[idx] = row[valid].to(flat.dtype)


def standin_decode_q_prep(state: MLALayerState, q: torch.Tensor) -> torch.Tensor:
    """What vLLM's attention does to decode rows before ``forward_mqa``."""
    P = state.w_uk_t.shape[1]
    q_cat = torch.cat((absorb_q_nope(q[..., :P], state.w_uk_t), q[..., P:].float()), dim=-1)
    out = q.new_empty(q_cat.shape, dtype=state.q_out_dtype(q.dtype))
    finish_q(q_cat, state.q_scale, out)
    return out


def standin_attention(state: StandinMLALayer, q, q_prepped, kv_c_normed, k_pe, output) -> None:
    """Decode rows from ``q_prepped`` (latent MQA over ``context_slots``),
    prefill rows from ``q`` (causal MHA over their own kv); writes ``output``."""
    T, H, PR = q.shape
    _, P, L = state.w_uk_t.shape
    V = state.w_uv.shape[-1]
    nd = T if state.num_decode_tokens is None else min(state.num_decode_tokens, T)
    scale = state.softmax_scale or 1.0 / math.sqrt(PR)
    out = torch.zeros(T, H, V, dtype=torch.float32, device=q.device)
    if nd > 0:
        qd = q_prepped[:nd].float()
        if state.q_scale is not None:
            qd = qd * state.q_scale.float()
        rows = gather_cache_rows(state.kv_cache, state.context_slots, state.kv_cache_dtype,
                                 state.k_scale, dtype=torch.float32)  # [N, L+R]
        p = torch.softmax(torch.einsum("thd,nd->thn", qd, rows) * scale, dim=-1)
        latent = torch.einsum("thn,nl->thl", p, rows[:, :L])
        out[:nd] = torch.einsum("thl,hlv->thv", latent, state.w_uv.float())
    if nd < T:
        qp = q[nd:].float()
        kv = kv_c_normed[nd:].float()
        k_nope = torch.einsum("tl,hpl->thp", kv, state.w_uk_t.float())
        kpe = k_pe[nd:].reshape(T - nd, 1, -1).float().expand(-1, H, -1)
        k = torch.cat((k_nope, kpe), dim=-1)
        v = torch.einsum("tl,hlv->thv", kv, state.w_uv.float())
        s = torch.einsum("thd,shd->hts", qp, k) * scale
        causal = torch.ones(T - nd, T - nd, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~causal, float("-inf"))
        out[nd:] = torch.einsum("hts,shv->thv", torch.softmax(s, dim=-1), v)
    output.copy_(out.reshape(output.shape))


# --- op impls ------------------------------------------------------------------

def _kv_cache_update_impl(kv_c_normed, k_pe, layer_name, kv_cache_dtype, k_scale):
    write_cache(_state(layer_name), kv_c_normed, k_pe, kv_cache_dtype, k_scale)
    return torch.empty(0, device=kv_c_normed.device, dtype=kv_c_normed.dtype)


def _kv_cache_update_fake(kv_c_normed, k_pe, layer_name, kv_cache_dtype, k_scale):
    return torch.empty(0, device=kv_c_normed.device, dtype=kv_c_normed.dtype)


def _attention_impl(q, kv_c_normed, k_pe, output, layer_name, output_scale=None, output_block_scale=None,
                    kv_cache_dummy_dep=None, quant_group_size=None, quant_scale_ue8m0=None,
                    quant_col_major=None, quant_tma_aligned=None, q_dcp_replicated=None):
    if output_scale is not None or output_block_scale is not None or q_dcp_replicated is not None:
        raise NotImplementedError(
            f"{NAMESPACE}.{SCHEMAS_OF.ops['attention']}: output quantization and "
            "DCP are not modelled by the stand-in")
    state = _state(layer_name)
    if not isinstance(state, StandinMLALayer):
        raise TypeError(f"layer {layer_name_str(layer_name)!r} is not a StandinMLALayer")
    nd = q.shape[0] if state.num_decode_tokens is None else min(state.num_decode_tokens, q.shape[0])
    q_prepped = standin_decode_q_prep(state, q[:nd])  # the opaque decode q-prep
    standin_attention(state, q, q_prepped, kv_c_normed, k_pe, output)


def _attention_fake(q, kv_c_normed, k_pe, output, layer_name, output_scale=None, output_block_scale=None,
                    kv_cache_dummy_dep=None, quant_group_size=None, quant_scale_ue8m0=None,
                    quant_col_major=None, quant_tma_aligned=None, q_dcp_replicated=None):
    return None


def _fused_rope_impl(positions, q_pe, k_pe, kv_c, cos_sin_cache, is_neox, kv_cache_dtype, kv_cache_scale,
                     layer_name):
    state = _state(layer_name)
    cos, sin = cos_sin_for(cos_sin_cache, positions)
    T = positions.shape[0]
    q_rot = rope_fp32(q_pe, cos[:, None, :], sin[:, None, :], is_neox)
    k_rot = rope_fp32(k_pe.reshape(T, -1), cos, sin, is_neox)
    write_cache(state, kv_c, k_rot, kv_cache_dtype, kv_cache_scale)
    q_pe.copy_(q_rot)
    k_pe.copy_(k_rot.view(k_pe.shape))
    return torch.empty(0, device=kv_c.device, dtype=kv_c.dtype)


def _fused_rope_fake(positions, q_pe, k_pe, kv_c, cos_sin_cache, is_neox, kv_cache_dtype, kv_cache_scale,
                     layer_name):
    return torch.empty(0, device=kv_c.device, dtype=kv_c.dtype)


# Schemas as vLLM defines them (argument names, order, defaults and alias
# marks), so the passes see the same graph form.
_lib = torch.library.Library(NAMESPACE, "DEF")


def _define(role: str, mutates: tuple, impl, fake) -> torch._ops.OpOverload:
    return define_op(_lib, SCHEMAS_OF.ops[role], SCHEMAS_OF.schema(role, _LN), mutates=mutates, impl=impl,
                     fake=fake)


kv_cache_update = _define("kv_cache_update", (), _kv_cache_update_impl, _kv_cache_update_fake)
attention_with_output = _define("attention", ("output", "output_block_scale"), _attention_impl, _attention_fake)
fused_rope_kv_cache_update = _define("fused_rope", ("q_pe", "k_pe"), _fused_rope_impl, _fused_rope_fake)

op_handles.register_role("attention", attention_with_output)
op_handles.register_role("kv_cache_update", kv_cache_update)
op_handles.register_role("fused_rope", fused_rope_kv_cache_update)


def make_standin_layer(
    name: str,
    *,
    H: int,
    P: int = 128,
    L: int = 512,
    R: int = 64,
    V: int = 128,
    num_blocks: int = 8,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    kv_cache_dtype: str = "auto",
    q_fp8: bool = False,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
    register: bool = True,
) -> StandinMLALayer:
    """A random stand-in layer (registered in ``local_layers`` under ``name``).

    The cache starts with random rows (so attention over ``context_slots``
    reads real data); set ``slot_mapping``/``context_slots``/
    ``num_decode_tokens`` per step (:meth:`set_step`-style, see
    :func:`mla_passes.testing.models.set_step`).
    """
    g = generator or torch.Generator().manual_seed(hash(name) % (2**31))
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)  # noqa: E731
    D = L + R
    k_scale = torch.tensor([0.5 + torch.rand(1, generator=g).item()], dtype=torch.float32, device=device)
    init = rnd(num_blocks, block_size, D)
    if is_fp8_kv_cache(kv_cache_dtype):
        kv_cache = quantize_fp8(init, k_scale, platform_fp8_dtype(device)).view(torch.uint8)
    else:
        kv_cache = init.to(dtype)
    q_scale = None
    if q_fp8:
        q_scale = torch.tensor([0.05 + 0.1 * torch.rand(1, generator=g).item()], dtype=torch.float32, device=device)
    state = StandinMLALayer(
        w_uk_t=rnd(H, P, L, scale=1.0 / math.sqrt(P)).to(dtype),
        kv_cache=kv_cache,
        slot_mapping=torch.zeros(0, dtype=torch.int64, device=device),
        kv_cache_dtype=kv_cache_dtype,
        k_scale=k_scale,
        q_scale=q_scale,
        w_uv=rnd(H, L, V, scale=1.0 / math.sqrt(L)).to(dtype),
        context_slots=torch.arange(num_blocks * block_size, device=device),
    )
    if register:
        local_layers.register(name, state)
    return state
