"""The decode q-prep lift as a (pattern, replacement) pair.

``MLADecodeQPrepLiftPass`` implements it procedurally (why: see
:mod:`mla_passes.passes.lift`); these functions state what it matches and
what it emits, for ``mla-passes patterns`` and the docs. ``L``, ``R`` and
``out_dtype`` are compile-time constants of the layer.
"""

from __future__ import annotations

import torch

import mla_passes.ops  # noqa: F401


def q_prep_lift_pattern(q, kv_c_normed, k_pe, output, layer_name, dep):
    """attention with the decode q-prep inside (opaque)"""
    torch.ops.mla_passes_standin.unified_mla_attention_with_output(
        q, kv_c_normed, k_pe, output, layer_name, kv_cache_dummy_dep=dep)
    return output


def q_prep_lift_replacement(q, kv_c_normed, k_pe, output, layer_name, dep):
    q_prepped = torch.ops.mla_passes.mla_decode_q_prep(q, layer_name, 512, 64, torch.bfloat16)
    torch.ops.mla_passes.mla_attention_with_prepped_q(q, q_prepped, kv_c_normed, k_pe, output, layer_name, dep)
    return output


PATTERNS = [("mla_decode_q_prep_lift", q_prep_lift_pattern, q_prep_lift_replacement)]
