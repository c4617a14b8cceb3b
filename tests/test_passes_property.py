"""Property: for random small configurations the fused graph computes what eager does."""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from conftest import make_pm, run_case  # noqa: E402
from mla_passes.layers import local_layers  # noqa: E402

import torch  # noqa: E402


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(T=st.integers(1, 9), H=st.sampled_from([1, 2, 4]), block_size=st.sampled_from([1, 4, 16]),
       is_neox=st.booleans(), kv_cache_dtype=st.sampled_from(["auto", "fp8"]), pad_every=st.sampled_from([0, 2, 3]),
       form=st.sampled_from(["raw", "fused_rope"]))
def test_fused_equals_eager(T, H, block_size, is_neox, kv_cache_dtype, pad_every, form):
    torch._dynamo.reset()
    local_layers.clear()
    pm = make_pm()
    res = run_case(pm, num_layers=1, T=T, H=H, block_size=block_size, num_blocks=max(2, 2 * T // block_size + 2),
                   is_neox=is_neox, kv_cache_dtype=kv_cache_dtype, form=form, pad_every=pad_every)
    assert pm.matched_counts["mla_qk_rope_kvcache_fusion"] == 1
