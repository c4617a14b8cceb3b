"""The passes and ops on a CUDA device: the fusion puts the Triton kernel into a
real Inductor graph, and the fused op survives CUDA-graph capture and replay.

Skipped without a GPU; run on the GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import dequant_cache, make_pm, run_both
from mla_passes.kernels import fused_decode_prep, gather_cache_rows, resolve_backend
from mla_passes.layers import MLALayerState, local_layers
from mla_passes.testing.models import build_decode_stack, set_step
from mla_passes.ops import LayerName
from mla_passes.testing import fp8_step, make_case
from mla_passes.testing.backend import TestBackend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


@pytest.mark.parametrize("H", [16, 128])
@pytest.mark.parametrize("kv_cache_dtype,q_fp8", [("auto", False), ("fp8", True)])
@pytest.mark.parametrize("form", ["raw", "fused_rope"])
def test_inductor_on_cuda_matches_eager(H, kv_cache_dtype, q_fp8, form):
    """Fusion on CUDA (Triton backend through 'auto') inside Inductor equals eager.

    Layer 0 sees the same inputs on both sides: its cache rows must agree to one
    fp8 step (bf16 rounding for an 'auto' cache). Layer 1 inherits layer 0's
    rounding differences (the Triton kernel's fp32 accumulation order and
    reciprocal-scale quant vs the stand-ins' torch math), so it and the stack
    output are held to relative L2 errors."""
    assert resolve_backend("auto", "cuda") in ("triton", "aiter")
    st = build_decode_stack(2, H=H, hidden=256, kv_cache_dtype=kv_cache_dtype, q_fp8=q_fp8, form=form,
                            num_blocks=16, block_size=16, device="cuda")
    pm = make_pm()
    b = TestBackend(pm, inductor=True)
    compiled = torch.compile(st.module, backend=b, fullgraph=True)
    first, second = st.states.values()
    for i in range(3):  # later calls reuse the compiled graph with new inputs and slots
        T = 8
        pos, h = st.make_inputs(T, seed=10 + i, device="cuda")
        set_step(st, T, seed=20 + i)
        eager, eager_caches, out, snap = run_both(st, compiled, pos, h)
        torch.cuda.synchronize()
        caches = st.snapshot_caches()
        got0 = dequant_cache(caches[next(iter(st.states))], first)
        ref0 = dequant_cache(eager_caches[next(iter(st.states))], first)
        if kv_cache_dtype == "auto":
            torch.testing.assert_close(got0, ref0, atol=3e-2, rtol=2e-2)
        else:
            ks = first.k_scale
            assert _within_one_fp8_step(got0 / ks, ref0 / ks, torch.float8_e4m3fn), f"call {i}: layer 0 cache"
        name1 = list(st.states)[1]
        assert _rel_l2(dequant_cache(caches[name1], second), dequant_cache(eager_caches[name1], second)) < 0.05
        assert _rel_l2(out, eager) < 0.03, f"call {i}: stack output"
        # rows outside this step's slot mapping are untouched in every layer
        for name, state in st.states.items():
            n = state.kv_cache.shape[0] * state.kv_cache.shape[1]
            untouched = torch.ones(n, dtype=torch.bool, device="cuda")
            untouched[state.slot_mapping[state.slot_mapping >= 0].long()] = False
            flat = lambda c: c.view(n, -1).view(torch.uint8)[untouched]  # noqa: E731
            assert torch.equal(flat(caches[name]), flat(snap[name])), f"call {i}: {name} wrote outside its slots"
    assert pm.matched_counts["mla_qk_rope_kvcache_fusion"] == 2
    assert b.count_after("mla_passes.mla_fused_decode_prep") == 2


def _within_one_fp8_step(got: torch.Tensor, ref: torch.Tensor, dtype) -> bool:
    step = fp8_step(torch.maximum(got.abs(), ref.abs()), dtype)
    return bool(((got - ref).abs() <= step * 1.01 + 1e-6).all())


def test_fused_op_cuda_graph_replay():
    """mla_fused_decode_prep captured once replays right with new q/k/positions/slots every time."""
    T, H, fp8 = 16, 16, torch.float8_e4m3fn
    name = "gpu.graph.layer"
    base = make_case(T, H, kv_cache_dtype="fp8", q_fp8_dtype=fp8, device="cuda", seed=0)
    slots = base.slot_mapping.clone()  # the persistent slot buffer a runner copies into
    state = MLALayerState(w_uk_t=base.w_uk_t, kv_cache=base.kv_cache, slot_mapping=slots, kv_cache_dtype="fp8",
                          k_scale=base.k_scale, q_scale=base.q_scale, q_fp8_dtype=fp8)
    local_layers.register(name, state)
    ln = LayerName(name)
    q, kv_c, k_pe, positions = base.q, base.kv_c, base.k_pe, base.positions

    def step():
        return torch.ops.mla_passes.mla_fused_decode_prep(q, kv_c, k_pe, positions, base.cos_sin_cache,
                                                           base.is_neox, ln, fp8, "auto")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up (Triton compile) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    for i in range(1, 4):
        new = make_case(T, H, kv_cache_dtype="fp8", q_fp8_dtype=fp8, device="cuda", seed=100 + i)
        new.w_uk_t, new.k_scale, new.q_scale, new.is_neox = base.w_uk_t, base.k_scale, base.q_scale, base.is_neox
        q.copy_(new.q)
        kv_c.copy_(new.kv_c)
        k_pe.copy_(new.k_pe)
        positions.copy_(new.positions)
        slots.copy_(new.slot_mapping)
        state.kv_cache.copy_(new.kv_cache)        # poisoned cache
        expect = new.clone()
        fused_decode_prep(*expect.kernel_args(), backend="reference")
        out.fill_(0)  # poison: replay must rewrite every row
        graph.replay()
        torch.cuda.synchronize()
        assert _within_one_fp8_step(out.float(), expect.q_out.float(), fp8), f"replay {i}: q_out"
        torch.testing.assert_close(q.float(), expect.q.float(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(k_pe.float(), expect.k_pe.float(), rtol=1e-2, atol=1e-2)
        all_slots = torch.arange(state.kv_cache.shape[0] * state.kv_cache.shape[1], device="cuda")
        got = gather_cache_rows(state.kv_cache, all_slots, "fp8", state.k_scale, dtype=torch.float32)
        ref = gather_cache_rows(expect.kv_cache, all_slots, "fp8", state.k_scale, dtype=torch.float32)
        ks = state.k_scale
        assert _within_one_fp8_step(got / ks, ref / ks, fp8), f"replay {i}: cache"
        untouched = torch.ones(all_slots.shape[0], dtype=torch.bool, device="cuda")
        untouched[new.slot_mapping[new.slot_mapping >= 0].long()] = False
        assert torch.equal(got[untouched], ref[untouched]), f"replay {i}: a cache row outside slot_mapping changed"
