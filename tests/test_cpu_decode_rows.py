"""On CPU the ops prep q only for the step's decode rows (vLLM on CPU has one
graph for every batch, so prefill steps run them too).

What must hold: same output shape as the fake (invariant 1); decode rows
bit-identical to prepping every row; the other rows zero (never garbage);
RoPE in place and the cache write still cover every row.
"""

from __future__ import annotations

import pytest
import torch

import mla_passes  # noqa: F401  (registers torch.ops.mla_passes)
from mla_passes.kernels import fused_decode_prep
from mla_passes.layers import MLALayerState, local_layers, resolve_layer
from mla_passes.ops import LayerName
from mla_passes.testing import make_case

ops = torch.ops.mla_passes
NAME = "model.layers.0.attn"


@pytest.fixture
def layer():
    def make(T, nd, q_fp8=True):
        case = make_case(T, 8, P=32, L=64, R=16, block_size=16, kv_cache_dtype="fp8",
                         q_fp8_dtype=torch.float8_e4m3fn if q_fp8 else None, seed=T + nd)
        local_layers.register(NAME, MLALayerState(
            w_uk_t=case.w_uk_t, kv_cache=case.kv_cache, slot_mapping=case.slot_mapping,
            kv_cache_dtype="fp8", k_scale=case.k_scale, q_scale=case.q_scale if q_fp8 else None,
            q_fp8_dtype=torch.float8_e4m3fn if q_fp8 else None, num_decode_tokens=nd,
        ))
        return case

    yield make
    local_layers.unregister(NAME)


@pytest.mark.parametrize("T,nd", [(9, 3), (9, 0), (64, 1)])
def test_fused_op_preps_decode_rows_only(layer, T, nd):
    """Fused op, prefill rows present: decode rows exact, the rest zero, RoPE and cache for every row."""
    case = layer(T, nd)
    expect = case.clone()
    fused_decode_prep(*expect.kernel_args(), backend="reference")
    out = ops.mla_fused_decode_prep(case.q, case.kv_c, case.k_pe, case.positions, case.cos_sin_cache,
                                    case.is_neox, LayerName(NAME), torch.float8_e4m3fn, "reference")
    assert out.shape == expect.q_out.shape == (T, 8, 80)
    assert torch.equal(out[:nd].view(torch.uint8), expect.q_out[:nd].view(torch.uint8))
    assert not out[nd:].view(torch.uint8).any()
    assert torch.equal(case.q, expect.q) and torch.equal(case.k_pe, expect.k_pe)
    assert torch.equal(case.kv_cache.view(torch.uint8), expect.kv_cache.view(torch.uint8))


def test_fused_op_all_decode_rows_unchanged(layer):
    """num_decode_tokens >= T (a decode step): every row prepped, as before."""
    case = layer(6, 6)
    expect = case.clone()
    fused_decode_prep(*expect.kernel_args(), backend="reference")
    out = ops.mla_fused_decode_prep(case.q, case.kv_c, case.k_pe, case.positions, case.cos_sin_cache,
                                    case.is_neox, LayerName(NAME), torch.float8_e4m3fn, "reference")
    assert torch.equal(out.view(torch.uint8), expect.q_out.view(torch.uint8))


@pytest.mark.parametrize("q_fp8", [True, False])
def test_lift_op_preps_decode_rows_only(layer, q_fp8):
    """Lift op: decode rows equal the all-rows result, the rest zero, shape unchanged."""
    T, nd = 7, 2
    case = layer(T, nd, q_fp8)
    out_dtype = torch.float8_e4m3fn if q_fp8 else case.q.dtype
    out = ops.mla_decode_q_prep(case.q, LayerName(NAME), 64, 16, out_dtype)
    resolve_layer(NAME).num_decode_tokens = None
    full = ops.mla_decode_q_prep(case.q, LayerName(NAME), 64, 16, out_dtype)
    assert out.shape == full.shape == (T, 8, 80)
    bits = torch.uint8 if q_fp8 else torch.int16
    assert torch.equal(out[:nd].view(bits), full[:nd].view(bits))
    assert not out[nd:].view(bits).any() and full[nd:].view(bits).any()
