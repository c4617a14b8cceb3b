"""Invariant 1 through compilation: one graph compiled for T in [1, 256], run at 1, 7 and 256."""

from __future__ import annotations

import pytest
import torch

from conftest import CaseResult, assert_close_case, make_pm, run_both
from mla_passes import compile_range
from mla_passes.testing.models import build_decode_stack, set_step
from mla_passes.pass_manager import TokenRange
from mla_passes.testing.backend import TestBackend
from torch._dynamo.decorators import mark_unbacked


def test_one_graph_all_token_counts():
    """Fake and real shapes of the fused/lifted ops agree for every T the graph serves."""
    st = build_decode_stack(2, H=4, hidden=64, num_blocks=40, block_size=16)
    pm = make_pm(max_num_seqs=256)
    b = TestBackend(pm, inductor=True)
    compiled = torch.compile(st.module, backend=b, fullgraph=True)
    with compile_range(TokenRange(1, 256)):
        for T in (256, 7, 1):
            pos, h = st.make_inputs(T, seed=7 + T)
            if T == 256:
                mark_unbacked(pos, 0)
                mark_unbacked(h, 0)
            set_step(st, T, num_decode_tokens=None if T != 7 else 4, seed=T)
            eager, ref_caches, out, _ = run_both(st, compiled, pos, h)
            assert_close_case(CaseResult(st, b, pm, eager, out, ref_caches, st.snapshot_caches()))
    assert len(b.graphs_after) == 1, "one graph served every token count"
    assert b.matched[0]["mla_qk_rope_kvcache_fusion"] == 2


def _plain_compile_run(pm, st, token_counts, **compile_kw):
    """``torch.compile(model)`` with ``pm`` as Inductor's post-grad custom pass;
    eager vs compiled at each T (fresh inputs, same caches)."""
    import torch._inductor.config as ic

    with ic.patch(post_grad_custom_post_pass=pm, fx_graph_cache=False):
        compiled = torch.compile(st.module, **compile_kw)
        for T in token_counts:
            pos, h = st.make_inputs(T, seed=5 + T)
            set_step(st, T, seed=T)
            eager, ref_caches, out, _ = run_both(st, compiled, pos, h)
            assert_close_case(CaseResult(st, None, pm, eager, out, ref_caches, st.snapshot_caches()))


@pytest.mark.parametrize("dynamic", [None, True])
def test_plain_torch_compile_dynamic(dynamic):
    """torch.compile(model) then T=4, T=8 (automatic dynamic) or dynamic=True crashed in the gating on int_oo."""
    st = build_decode_stack(2, H=4, hidden=64, num_blocks=8, block_size=16)
    pm = make_pm(max_num_seqs=256)
    _plain_compile_run(pm, st, (4, 8), dynamic=dynamic)
    # the last compile saw a symbolic, unbounded T: policy "infer" leaves it alone
    assert pm.last_decision.endswith("token count unbounded or unknown (policy 'infer')"), pm.last_decision


def test_plain_torch_compile_dynamic_applied():
    """A symbolic token count with policy "apply" is fused and numerically right at every T."""
    st = build_decode_stack(2, H=4, hidden=64, num_blocks=8, block_size=16)
    pm = make_pm(max_num_seqs=256, no_range_policy="apply")
    _plain_compile_run(pm, st, (3, 8, 5), dynamic=True)
    assert pm.matched_counts["mla_qk_rope_kvcache_fusion"] == 2


def test_token_count_bound_int_oo():
    """An unbounded symbolic size (upper bound int_oo, whose is_finite is True) reads as no bound."""
    from torch.utils._sympy.numbers import int_oo
    from mla_passes.gating import DecodeGate, _finite_int

    assert _finite_int(int_oo) is None and _finite_int(-int_oo) is None
    assert _finite_int(7) == 7
    gate = DecodeGate(8)
    assert not gate.is_applicable_for_range(TokenRange(1, int_oo))
    assert gate.is_applicable_for_range(TokenRange(1, 8))
