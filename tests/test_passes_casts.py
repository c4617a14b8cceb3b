"""Casts around RoPE are part of the math (issue 20): the fusion drops a cast
only when doing so changes no result beyond the stored dtype's rounding;
a narrowing one (through fp8, through bf16 in an fp32 model, ...) refuses
the layer, on the registered-pattern path and the semantic fallback alike.
Eager == compiled in every case."""

from __future__ import annotations

import pytest
import torch

from conftest import make_pm, run_case
from mla_passes.patterns import casts, qk_rope_kvcache, rope
from mla_passes.testing import models

FUSION = "mla_qk_rope_kvcache_fusion"
LIFT = "mla_decode_q_prep_lift"
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _rt(x, dtype):
    """``x`` rounded through ``dtype`` and back (None: untouched)."""
    return x if dtype is None else x.to(dtype).to(x.dtype)


def cast_rope(*, style="native", x_q=None, x_k=None, cs=None, tb=None, out_q=None, out_k=None, compute=None):
    """A RoPE (vLLM ``forward_native`` style, or ``"commuted"``: ``cos * x1``, which no registered
    pattern covers) with casts on its edges: ``x_q``/``x_k`` round the input through a dtype,
    ``cs`` rounds cos/sin through one (``tb``: the whole table, before the gather), ``out_q`` casts the rotated q_pe (assigned back into q,
    which casts again), ``out_k`` rounds the rotated k through one; ``compute``: the dtype the
    rotation runs in (the input cast up to it, the result cast back to the stored dtype)."""

    def fn(positions, q_pe, k_pe, cos_sin_cache, is_neox):
        T = positions.shape[0]
        cos, sin = _rt(cos_sin_cache, tb).index_select(0, positions).chunk(2, dim=-1)
        cos, sin = _rt(cos, cs), _rt(sin, cs)

        def rot(x_in, xc, oc, last):
            shape = x_in.shape
            x = _rt(x_in.view(T, -1, shape[-1]), xc)
            if compute is not None:
                x = x.to(compute)
            c, s = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
            if is_neox:
                x1, x2 = torch.chunk(x, 2, dim=-1)
            else:
                x1, x2 = x[..., ::2], x[..., 1::2]
            if style == "commuted":
                o1, o2 = c * x1 - s * x2, c * x2 + s * x1
            else:
                o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
            y = torch.cat((o1, o2), dim=-1) if is_neox else torch.stack((o1, o2), dim=-1).flatten(-2)
            if compute is not None:
                y = y.to(x_in.dtype)
            y = y.reshape(shape)
            return last(y, oc)

        q = rot(q_pe, x_q, out_q, lambda y, d: y if d is None else y.to(d))
        k = rot(k_pe, x_k, out_k, _rt)
        return q, k

    return fn


def _run(monkeypatch, fn, *, dtype=torch.bfloat16, is_neox=False, cos_sin_dtype=None):
    monkeypatch.setitem(models.ROPES, "under_test", fn)
    pm = make_pm()
    res = run_case(pm, num_layers=1, T=5, rope="under_test", is_neox=is_neox, dtype=dtype,
                   cos_sin_dtype=cos_sin_dtype)
    fusion = next(p for p in pm.passes if p.name == FUSION)
    return pm, res, fusion


def _assert_refused(pm, res, fusion, *, reason="rounds through the cast"):
    assert pm.matched_counts == {FUSION: 0, LIFT: 1}, fusion.refusals
    assert res.backend.count_after("mla_passes.mla_fused_decode_prep") == 0
    assert any(reason in r for r in fusion.refusals), fusion.refusals
    # nothing fused: the compiled q_pe path is eager's, so outputs agree far tighter than run_case's bound
    torch.testing.assert_close(res.out.float(), res.eager_out.float(), atol=1e-2, rtol=1e-2)


def _assert_fused_by(pm, fusion, pattern_kind):
    assert pm.matched_counts[FUSION] == 1, fusion.refusals
    semantic = fusion.pattern_counts["rope_semantic"]
    if pattern_kind == "pattern":
        assert semantic == 0 and any(fusion.pattern_counts[n] for n in qk_rope_kvcache.ROPE_FORMS)
    else:
        assert semantic == 1


# --- case 1: q_pe / k_pe rounded through fp8 before RoPE ---------------------------------

@pytest.mark.parametrize("is_neox", [False, True])
@pytest.mark.parametrize("edge", ["x_q", "x_k"])
def test_input_rounded_through_fp8_refused(monkeypatch, edge, is_neox):
    """q_pe/k_pe rounded through fp8 before RoPE: the patterns stripped the cast and the fused op rotated
    the unrounded value (q_pe 2.7% off)."""
    pm, res, fusion = _run(monkeypatch, cast_rope(**{edge: E4M3}), is_neox=is_neox)
    _assert_refused(pm, res, fusion)


# --- case 2: the rotated q_pe cast to fp8 -------------------------------------------------

@pytest.mark.parametrize("is_neox", [False, True])
@pytest.mark.parametrize("out", [E4M3, E5M2])
def test_output_cast_to_fp8_refused(monkeypatch, out, is_neox):
    """``q[..., P:] = rope(q_pe).to(fp8)`` matched the cast variant of the patterns, whose guard never
    read the cast's dtype: fused as plain RoPE (q_pe 2.6% off)."""
    pm, res, fusion = _run(monkeypatch, cast_rope(out_q=out), is_neox=is_neox)
    _assert_refused(pm, res, fusion)


def test_output_cast_to_fp8_on_k_refused(monkeypatch):
    """The rotated k rounded through fp8 before the cache update: refused too."""
    pm, res, fusion = _run(monkeypatch, cast_rope(out_k=E4M3))
    _assert_refused(pm, res, fusion)


# --- case 3: cos/sin rounded through fp8 --------------------------------------------------

@pytest.mark.parametrize("where", ["cs", "tb"])
@pytest.mark.parametrize("style", ["native", "commuted"])
@pytest.mark.parametrize("through", [E4M3, E5M2])
def test_cos_sin_rounded_through_fp8_refused(monkeypatch, through, style, where):
    """cos/sin rounded through fp8 (after the gather, or the whole table) were fused as if read from the
    bf16 table (q_pe 2% off), by the pattern (``native``) and by the semantic fallback (``commuted``)."""
    pm, res, fusion = _run(monkeypatch, cast_rope(style=style, **{where: through}))
    _assert_refused(pm, res, fusion)


# --- case 4: the semantic fallback's tolerance and trials ----------------------------------

@pytest.mark.parametrize("dtype,through", [(torch.bfloat16, E4M3), (torch.bfloat16, E5M2),
                                           (torch.float32, torch.bfloat16), (torch.float32, torch.float16)])
def test_fallback_input_round_trip_refused(monkeypatch, dtype, through):
    """The semantic check widened its tolerance to the narrowest dtype in the subgraph: a q_pe round
    trip through fp8 in a bf16 model passed (2.7% off), and through bf16 in an fp32 model."""
    pm, res, fusion = _run(monkeypatch, cast_rope(style="commuted", x_q=through), dtype=dtype)
    _assert_refused(pm, res, fusion)


@pytest.mark.parametrize("trials", ["random", "exact"])
@pytest.mark.parametrize("dtype,through", [(torch.bfloat16, E4M3), (torch.float32, torch.bfloat16)])
def test_fallback_numbers_alone_refuse_round_trip(monkeypatch, trials, dtype, through):
    """With the structural cast check out of the way, the numbers alone refuse a round trip: the random
    trials at the stored dtype's rounding (they used the narrowest intermediate's), and the exact trial
    (its halves in [-8, 8] were all values of e4m3fn, so it could not see an fp8 round trip)."""
    if trials == "exact" and dtype == torch.float32:
        pytest.skip("a bf16 round trip keeps the exact trial's five-bit values: the random trials' job")
    monkeypatch.setattr(rope, "narrowing_cast", lambda m: None, raising=False)
    monkeypatch.setattr(rope, "_verdicts", {})
    monkeypatch.setattr(rope, "TRIALS", tuple(t for t in rope.TRIALS if t[1] == (trials == "exact")))
    pm, res, fusion = _run(monkeypatch, cast_rope(style="commuted", x_q=through), dtype=dtype)
    _assert_refused(pm, res, fusion, reason="does not compute RoPE")


# --- harmless casts still fuse, by pattern where a pattern covers the form -----------------

@pytest.mark.parametrize("style,kind", [("native", "pattern"), ("commuted", "semantic")])
@pytest.mark.parametrize("variant", [
    dict(compute=torch.float32),                      # x.float() ... .to(bf16): the op rounds once, to bf16
    dict(x_q=torch.float32, x_k=torch.float32),       # a widening round trip changes nothing
    dict(cs=torch.float32),
    dict(tb=torch.float32),
    dict(out_q=torch.float32),                        # widened, then assigned back into bf16 q
    dict(cos_sin_dtype=torch.float32),                # an fp32 table read in a bf16 RoPE
])
def test_harmless_casts_still_fused(monkeypatch, variant, style, kind):
    """Widening casts, and casts that round no coarser than the stored bf16, are not refused."""
    variant = dict(variant)
    table = variant.pop("cos_sin_dtype", None)
    pm, res, fusion = _run(monkeypatch, cast_rope(style=style, **variant), cos_sin_dtype=table)
    _assert_fused_by(pm, fusion, kind)


# --- the rule itself ----------------------------------------------------------------------

def test_holds_is_value_preservation():
    """``holds(dst, src)`` is True exactly when every finite value of src round-trips through dst."""
    dtypes = [E4M3, E5M2, torch.float16, torch.bfloat16, torch.float32]
    for src in dtypes:
        # every finite value of an 8-bit dtype, and a spread of src values for the wider ones
        if src.itemsize == 1:
            vals = torch.arange(256, dtype=torch.uint8).view(src).float()
        else:
            g = torch.Generator().manual_seed(0)
            vals = torch.cat([torch.randn(4000, generator=g) * 10.0 ** e for e in range(-30, 30, 3)])
            vals = vals.to(src).float()
            vals = torch.cat([vals, torch.tensor([torch.finfo(src).max, torch.finfo(src).tiny,
                                                  torch.finfo(src).tiny * torch.finfo(src).eps])])
        vals = vals[torch.isfinite(vals)]
        for dst in dtypes:
            back = vals.to(src).to(dst).to(src).float()
            keeps = bool((back == vals).all())
            assert casts.holds(dst, src) == keeps, (src, dst)
