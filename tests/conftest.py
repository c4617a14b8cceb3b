"""Shared fixtures for the pass tests: device, clean dynamo/layer state, and
``run_case`` which runs a decode stack eagerly and compiled and returns both."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from mla_passes import MLAPassManager, PassConfig
from mla_passes.kernels import gather_cache_rows
from mla_passes.layers import local_layers
from mla_passes.testing.models import build_decode_stack, set_step
from mla_passes.testing import fp8_step
from mla_passes.testing.backend import TestBackend


# Tests run the passes in strict mode: an unexpected exception while matching
# a layer raises instead of becoming a refusal with a warning
# (mla_passes.passes.base). A test of the lenient mode sets it to "0".
os.environ["MLA_PASSES_STRICT"] = "1"


@pytest.fixture
def device():
    return "cpu"


@pytest.fixture(autouse=True)
def _clean_state():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    local_layers.clear()


@dataclass
class CaseResult:
    stack: object
    backend: TestBackend
    pm: MLAPassManager | None
    eager_out: torch.Tensor
    out: torch.Tensor
    eager_caches: dict
    caches: dict


def make_pm(fuse=True, max_num_seqs=256, num_speculative_tokens=0, **cfg):
    return MLAPassManager(PassConfig(fuse_aiter_qk_rope_kvcache_mla=fuse, **cfg), max_num_seqs=max_num_seqs,
                          num_speculative_tokens=num_speculative_tokens)


def run_both(st, compiled, pos, h):
    """Run the stack eagerly, then ``compiled``, from the same cache contents.
    Returns (eager output, caches after eager, compiled output, caches before)."""
    snap = st.snapshot_caches()
    with torch.no_grad():
        eager = st.module(pos, h)
    eager_caches = st.snapshot_caches()
    st.restore_caches(snap)
    with torch.no_grad():
        out = compiled(pos, h)
    return eager, eager_caches, out, snap


def run_case(pm=None, *, T=5, num_layers=2, inductor=False, functionalized_v2=False, num_decode_tokens=None,
             dynamic=False, run_T=None, step_seed=1, stack=None, pad_every=3, **stack_kw) -> CaseResult:
    """Build (or reuse) a stack, run it eagerly and compiled with ``pm`` on the
    same fresh inputs and caches, return outputs and caches of both."""
    stack_kw.setdefault("H", 4)
    stack_kw.setdefault("hidden", 64)
    st = stack or build_decode_stack(num_layers, **stack_kw)
    b = TestBackend(pm, inductor=inductor, functionalized_v2=functionalized_v2)
    compiled = torch.compile(st.module, backend=b, fullgraph=True, dynamic=dynamic or None)
    res = None
    for t in ([T] if run_T is None else run_T):
        pos, h = st.make_inputs(t, seed=100 + t)
        set_step(st, t, num_decode_tokens=num_decode_tokens, seed=step_seed + t, pad_every=pad_every)
        eager, eager_caches, out, _ = run_both(st, compiled, pos, h)
        res = CaseResult(st, b, pm, eager, out, eager_caches, st.snapshot_caches())
        assert_close_case(res)
    return res


def dequant_cache(cache: torch.Tensor, state) -> torch.Tensor:
    slots = torch.arange(cache.shape[0] * cache.shape[1], device=cache.device)
    return gather_cache_rows(cache, slots, state.kv_cache_dtype, state.k_scale, dtype=torch.float32)


def assert_close_case(res: CaseResult) -> None:
    """Compiled == eager for the output and every layer's cache (bf16 / fp8 tolerance)."""
    torch.testing.assert_close(res.out.float(), res.eager_out.float(), atol=6e-2, rtol=3e-2)
    for name, state in res.stack.states.items():
        got = dequant_cache(res.caches[name], state)
        ref = dequant_cache(res.eager_caches[name], state)
        if state.kv_cache_dtype == "auto":
            torch.testing.assert_close(got, ref, atol=3e-2, rtol=2e-2)
        else:
            # one fp8 step (at the value's magnitude) of rounding-order slack
            step = fp8_step(torch.maximum(got.abs(), ref.abs()) / state.k_scale, torch.float8_e4m3fn) * state.k_scale
            assert bool(((got - ref).abs() <= step * 1.01 + 1e-3).all()), (got - ref).abs().max()
