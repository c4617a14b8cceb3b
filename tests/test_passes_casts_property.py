"""Property (issue 20): a RoPE with casts inserted at any of its edges (the q/k
input, cos/sin or the whole table, the q/k output; fp8 e4m3fn/e5m2, fp16, bf16, fp32) is fused
only when eager equals RoPE to the stored dtype's rounding, and then the
fused values equal eager's to that rounding; a RoPE whose casts change it is
refused, and compiled == eager either way. Casts that round no coarser than
the model dtype must not cost the fusion."""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import torch  # noqa: E402

from conftest import make_pm  # noqa: E402
from mla_passes.layers import local_layers  # noqa: E402
from mla_passes.testing.backend import TestBackend  # noqa: E402
from mla_passes.testing.models import RopeLayer, build_decode_stack, set_step  # noqa: E402
from test_passes_casts import cast_rope  # noqa: E402

FUSION = "mla_qk_rope_kvcache_fusion"
CAST_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float16, torch.bfloat16, torch.float32]
# written out, not derived from finfo: the casts that round no coarser than each model dtype
NO_COARSER = {torch.bfloat16: {torch.bfloat16, torch.float32}, torch.float32: {torch.float32},
              torch.float16: {torch.float16, torch.float32}}
EDGES = ("x_q", "x_k", "cs", "tb", "out_q", "out_k")


def _rope_and_bound(x, pos, table, is_neox, u):
    """RoPE of ``x`` in float64, written pair by pair, and per element the bound of
    six roundings (unit roundoff ``u``) of its two terms' magnitude."""
    x = x.double()
    R = x.shape[-1]
    cs = table.double()[pos.long()]
    shape = (-1,) + (1,) * (x.dim() - 2) + (R // 2,)
    c, s = cs[:, : R // 2].reshape(shape), cs[:, R // 2:].reshape(shape)
    a, b = (x[..., : R // 2], x[..., R // 2:]) if is_neox else (x[..., 0::2], x[..., 1::2])
    o1, o2 = a * c - b * s, b * c + a * s
    m1, m2 = (a * c).abs() + (b * s).abs(), (b * c).abs() + (a * s).abs()
    join = (lambda p, q: torch.cat((p, q), -1)) if is_neox else (lambda p, q: torch.stack((p, q), -1).flatten(-2))
    return join(o1, o2), join(m1, m2) * 6 * u + 1e-30


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float16]),
       style=st.sampled_from(["native", "commuted"]), is_neox=st.booleans(),
       table_fp32=st.booleans(),
       edges=st.fixed_dictionaries({e: st.one_of(st.none(), st.none(), st.sampled_from(CAST_DTYPES))
                                    for e in EDGES}))
def test_fused_only_when_eager_is_rope_to_the_rounding(dtype, style, is_neox, table_fp32, edges):
    torch._dynamo.reset()
    local_layers.clear()
    T = 5
    stack = build_decode_stack(1, H=2, hidden=64, dtype=dtype, is_neox=is_neox, num_blocks=2, block_size=8,
                               cos_sin_dtype=torch.float32 if table_fp32 else None)
    module = RopeLayer(stack, cast_rope(style=style, **edges))
    pm = make_pm()
    compiled = torch.compile(module, backend=TestBackend(pm, inductor=False), fullgraph=True)
    pos, h = stack.make_inputs(T, seed=7)
    set_step(stack, T, seed=5, pad_every=3)
    (state,) = stack.states.values()
    snap = stack.snapshot_caches()
    with torch.no_grad():
        eager_out, eager_q = module(pos, h)
    eager_cache = state.kv_cache.clone()
    stack.restore_caches(snap)
    with torch.no_grad():
        out, got_q = compiled(pos, h)
    got_cache = state.kv_cache.clone()

    ly = module.ly
    P, R, L = ly.P, ly.R, ly.L
    u = torch.finfo(dtype).eps / 2
    q_in = (h @ ly.w_q).view(T, ly.H, P + R)[..., P:]
    k_in = (h @ ly.w_kv)[:, L:]
    ref_q, tol_q = _rope_and_bound(q_in, pos, stack.module.cos_sin_cache, is_neox, u)
    ref_k, tol_k = _rope_and_bound(k_in, pos, stack.module.cos_sin_cache, is_neox, u)
    slots = state.slot_mapping
    rows = slots >= 0
    eager_k = eager_cache.view(-1, L + R)[slots[rows], L:].double()
    got_k = got_cache.view(-1, L + R)[slots[rows], L:].double()
    ref_k, tol_k = ref_k[rows], tol_k[rows]

    def within(a, b, tol):
        return bool(((a.double() - b).abs() <= tol).all())

    eager_is_rope = within(eager_q, ref_q, tol_q) and within(eager_k, ref_k, tol_k)
    fused = pm.matched_counts[FUSION] == 1
    fusion = next(p for p in pm.passes if p.name == FUSION)
    refusals = fusion.refusals
    hypothesis.event("fused by the semantic check" if fused and fusion.pattern_counts["rope_semantic"]
                     else "fused by pattern" if fused else "refused")
    hypothesis.event(f"eager is RoPE to the rounding: {eager_is_rope}")
    # compiled == eager to the dtype's rounding, fused or not
    assert within(got_q, eager_q.double(), 2 * tol_q), (edges, fused)
    assert within(got_k, eager_k, 2 * tol_k), (edges, fused)
    if fused:  # fused only when eager is RoPE to the rounding, and then the fused op is too
        assert eager_is_rope, (edges, "fused a RoPE whose casts change it")
        assert within(got_q, ref_q, tol_q) and within(got_k, ref_k, tol_k), edges
    elif not eager_is_rope:
        assert any("cast" in r or "does not compute RoPE" in r for r in refusals), refusals
    if all(d is None or d in NO_COARSER[dtype] for d in edges.values()):
        assert fused, (edges, refusals)  # no cast rounds coarser than the model dtype: must fuse
    torch.testing.assert_close(out.float(), eager_out.float(), atol=6e-2, rtol=3e-2)
