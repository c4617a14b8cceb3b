"""The QK-RoPE / KV-cache / q-prep fusion as (pattern, replacement) pairs.

``MLAQkRopeKVCacheFusionPass`` implements them procedurally (why: see
:mod:`mla_passes.passes.fusion`); RoPE in the raw form is matched
semantically by :mod:`.rope`. These functions state the two matched forms
(DESIGN §3) and the emitted calls, with P=128, R=64, L=512 and a GPT-J RoPE
standing for any RoPE :mod:`.rope` accepts.
"""

from __future__ import annotations

import torch

import mla_passes.ops  # noqa: F401

P, R, L = 128, 64, 512


def _rope_gptj(x, cos, sin):
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def raw_form_pattern(q, kv_c_normed, k_pe, positions, cos_sin_cache, k_scale, output, layer_name):
    """raw form: aten RoPE, unified_mla_kv_cache_update, q slice_scatter, attention"""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    q_pe_rot = _rope_gptj(q[..., P:], cos.unsqueeze(-2), sin.unsqueeze(-2))
    k_pe_rot = _rope_gptj(k_pe.unsqueeze(1), cos.unsqueeze(-2), sin.unsqueeze(-2))
    q_new = torch.slice_scatter(q, q_pe_rot, -1, P)
    dep = torch.ops.mla_passes_standin.unified_mla_kv_cache_update(kv_c_normed, k_pe_rot, layer_name, "auto", k_scale)
    torch.ops.mla_passes_standin.unified_mla_attention_with_output(
        q_new, kv_c_normed, k_pe_rot, output, layer_name, kv_cache_dummy_dep=dep)
    return output


def fused_rope_form_pattern(q, kv_c_normed, k_pe, positions, cos_sin_cache, k_scale, output, layer_name):
    """fused-rope form: fused_rope_unified_mla_kv_cache_update (in place), attention"""
    dep = torch.ops.mla_passes_standin.fused_rope_unified_mla_kv_cache_update(
        positions, q[..., P:], k_pe, kv_c_normed, cos_sin_cache, False, "auto", k_scale, layer_name)
    torch.ops.mla_passes_standin.unified_mla_attention_with_output(
        q, kv_c_normed, k_pe.unsqueeze(1), output, layer_name, kv_cache_dummy_dep=dep)
    return output


def fusion_replacement(q, kv_c_normed, k_pe, positions, cos_sin_cache, k_scale, output, layer_name):
    q_prepped = torch.ops.mla_passes.mla_fused_decode_prep(
        q, kv_c_normed, k_pe, positions, cos_sin_cache, False, layer_name, torch.bfloat16, "auto")
    torch.ops.mla_passes.mla_attention_with_prepped_q(
        q, q_prepped, kv_c_normed, k_pe.unsqueeze(1), output, layer_name, None)
    return output


PATTERNS = [
    ("mla_qk_rope_kvcache_fusion_raw", raw_form_pattern, fusion_replacement),
    ("mla_qk_rope_kvcache_fusion_fused_rope", fused_rope_form_pattern, fusion_replacement),
]
