"""The semantic RoPE check (patterns/rope.py) holds a match to the rounding of
the dtype: near-misses are refused, true RoPE in every dtype is accepted."""

from __future__ import annotations

import pytest
import torch

from conftest import make_pm, run_case
from mla_passes.testing import models
from mla_passes.layers import local_layers
from mla_passes.patterns import rope

FUSION = "mla_qk_rope_kvcache_fusion"


def _perturbed(base, *, q=lambda x: x, k=lambda x: x):
    """``base`` RoPE with ``q`` / ``k`` applied to the rotated q_pe / k_pe."""

    def fn(positions, q_pe, k_pe, cos_sin_cache, is_neox):
        qr, kr = base(positions, q_pe, k_pe, cos_sin_cache, is_neox)
        return q(qr), k(kr)

    return fn


def _sin_scaled(positions, q_pe, k_pe, cos_sin_cache, is_neox):
    """Native RoPE whose sin half is scaled by 1.01 inside the graph (a table it does not read)."""
    R = cos_sin_cache.shape[-1]
    scaled = torch.cat((cos_sin_cache[:, : R // 2], cos_sin_cache[:, R // 2:] * 1.01), dim=-1)
    return models._rope_native(positions, q_pe, k_pe, scaled, is_neox)


def _half_rotated(positions, q_pe, k_pe, cos_sin_cache, is_neox):
    """Only the first half of q_pe's pairs rotated; the rest passed through."""
    qr, kr = models._rope_native(positions, q_pe, k_pe, cos_sin_cache, is_neox)
    R = q_pe.shape[-1]
    return torch.cat((qr[..., : R // 2], q_pe[..., R // 2:]), dim=-1), kr


NEAR_MISSES = {
    "q_x0.975": _perturbed(models._rope_native, q=lambda x: x * 0.975),
    "q_x1.02": _perturbed(models._rope_native, q=lambda x: x * 1.02),
    "q_plus_0.05": _perturbed(models._rope_native, q=lambda x: x + 0.05),
    "q_plus_0.1": _perturbed(models._rope_native, q=lambda x: x + 0.1),
    "k_x1.02": _perturbed(models._rope_native, k=lambda x: x * 1.02),
    "k_plus_0.05": _perturbed(models._rope_native, k=lambda x: x + 0.05),
    "both_x0.975": _perturbed(models._rope_native, q=lambda x: x * 0.975, k=lambda x: x * 0.975),
    "deepseek_x1.02": _perturbed(models._rope_deepseek, q=lambda x: x * 1.02, k=lambda x: x * 1.02),
    "sin_x1.01": _sin_scaled,
    "half_rotated": _half_rotated,
}


def _run(monkeypatch, fn, *, inductor=False, **kw):
    monkeypatch.setitem(models.ROPES, "under_test", fn)
    pm = make_pm()
    res = run_case(pm, num_layers=1, rope="under_test", inductor=inductor, **kw)
    return pm, res


@pytest.mark.parametrize("is_neox", [False, True])
@pytest.mark.parametrize("name", sorted(NEAR_MISSES))
def test_near_miss_refused(monkeypatch, name, is_neox):
    """RoPE x 0.975 / x 1.02 / + 0.05 / + 0.1 (and kin) were fused: the check tolerated 3% of the max."""
    pm, res = _run(monkeypatch, NEAR_MISSES[name], is_neox=is_neox)
    assert pm.matched_counts[FUSION] == 0
    assert res.backend.count_after("mla_passes.mla_fused_decode_prep") == 0


@pytest.mark.parametrize("name", ["q_x1.02", "q_plus_0.05"])
def test_near_miss_refused_through_inductor(monkeypatch, name):
    """The same near-misses were fused under plain Inductor too; the compiled output must equal eager."""
    pm, res = _run(monkeypatch, NEAR_MISSES[name], inductor=True)
    assert pm.matched_counts[FUSION] == 0
    torch.testing.assert_close(res.out.float(), res.eager_out.float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1.0005), (torch.float16, 1.004), (torch.bfloat16, 1.02)])
def test_scale_above_dtype_rounding_refused(monkeypatch, dtype, scale):
    """A scale a few roundings of the dtype away from 1 is refused in that dtype (fp32 held to fp32's rounding)."""
    fn = _perturbed(models._rope_native, q=lambda x: x * scale)
    pm, _ = _run(monkeypatch, fn, dtype=dtype, cos_sin_dtype=torch.float32)
    assert pm.matched_counts[FUSION] == 0


@pytest.mark.parametrize("rope_style", ["native", "deepseek"])
@pytest.mark.parametrize("is_neox", [False, True])
@pytest.mark.parametrize("dtype,cos_sin_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
    (torch.float16, torch.bfloat16), (torch.float32, torch.float32), (torch.float32, torch.bfloat16)])
def test_true_rope_accepted(dtype, cos_sin_dtype, is_neox, rope_style):
    """True RoPE, both conventions, native and DeepSeek-scaling, every q/cos-sin dtype pair, is fused."""
    pm = make_pm()
    run_case(pm, num_layers=1, rope=rope_style, is_neox=is_neox, dtype=dtype, cos_sin_dtype=cos_sin_dtype)
    assert pm.matched_counts[FUSION] == 1


def test_trials_are_independent():
    """Every trial draws its own inputs and table, one of them exact in every float dtype."""
    seeds = [s for s, _ in rope.TRIALS]
    assert len(set(seeds)) == len(seeds) >= 3
    assert any(exact for _, exact in rope.TRIALS) and any(not exact for _, exact in rope.TRIALS)


def test_within_rounding_is_per_element():
    """One element a little off fails, though the max error is far below 3% of the max (the old tolerance)."""
    x = torch.randn(5, 4, 64, dtype=torch.float64)
    cos, sin = torch.randn(5, 1, 32, dtype=torch.float64), torch.randn(5, 1, 32, dtype=torch.float64)
    ref, mag = rope._rope64(x, cos, sin, False)
    rnd = rope._rounding_of({torch.bfloat16})
    got = ref.to(torch.bfloat16)
    assert rope._within_rounding(got, ref, mag, rnd, exact=False)
    i = int(mag.flatten().argmin())
    bad = got.flatten().clone()
    bad[i] = bad[i] + 0.05
    assert not rope._within_rounding(bad.view_as(got), ref, mag, rnd, exact=False)


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(scale=st.one_of(st.floats(0.5, 0.985), st.floats(1.015, 2.0)),
       offset=st.one_of(st.just(0.0), st.floats(-0.2, -0.01), st.floats(0.01, 0.2)),
       target=st.sampled_from(["q", "k", "both"]), is_neox=st.booleans(),
       rope_style=st.sampled_from(["native", "deepseek"]))
def test_perturbed_rope_never_fused(scale, offset, target, is_neox, rope_style):
    """Property: RoPE * scale + offset (|scale - 1| >= 1.5%, bf16) on q, k or both is never taken for RoPE."""
    torch._dynamo.reset()
    local_layers.clear()
    f = lambda x: x * scale + offset  # noqa: E731
    fn = _perturbed(models.ROPES[rope_style], q=f if target != "k" else (lambda x: x),
                    k=f if target != "q" else (lambda x: x))
    old = models.ROPES.get("under_test")
    models.ROPES["under_test"] = fn
    try:
        pm = make_pm()
        run_case(pm, num_layers=1, rope="under_test", is_neox=is_neox)
    finally:
        models.ROPES.pop("under_test")
        if old is not None:
            models.ROPES["under_test"] = old
    assert pm.matched_counts[FUSION] == 0
