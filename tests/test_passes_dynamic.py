"""Invariant 1 through compilation: one graph compiled for T in [1, 256], run at 1, 7 and 256."""

from __future__ import annotations

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
