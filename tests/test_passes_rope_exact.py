"""The fusion is exact or refused (issue 26): an op that is the identity on a
few random trial values (``clamp(-30, 30)``, ``nan_to_num``), cos/sin read at
positions that differ between q and k on some tokens only, and operands the
kernel refuses at run time (a bf16 ``k_scale``, a cache dtype it does not
support, one position broadcast over the tokens) must not be fused as plain
RoPE. The tests run eager and compiled on inputs that make the edit bite
(values past +-30, positions 0 and >= 1000, inf; :func:`biting_inputs`) and
compare the rotated q_pe and the cache rows, not only op counts: bit for bit
where the layer is refused, to the RoPE's rounding where it is fused."""

from __future__ import annotations

import pytest
import torch

from conftest import dequant_cache, make_pm
from mla_passes.kernels.fp8 import KV_CACHE_DTYPES
from mla_passes.testing import fp8_step, standins
from mla_passes.testing.backend import TestBackend
from mla_passes.testing.models import RopeLayer, _rope_deepseek, _rope_native, build_decode_stack, set_step
from test_passes_adversarial import Variant, run_variant
from test_passes_casts import cast_rope

FUSION = "mla_qk_rope_kvcache_fusion"
LIFT = "mla_decode_q_prep_lift"
MAX_POS = 2048
T = 6


def biting_inputs(stack, *, seed=0):
    """(name, positions, hidden): plain random; every activation x 100 (past +-30); an inf in one
    token's hidden state (its q/k row becomes +-inf, RoPE gives inf and NaN). Positions include
    0, 1, 999, 1000 and the last row of the table."""
    pos, h = stack.make_inputs(T, seed=seed)
    pos = torch.tensor([0, 1, 999, 1000, MAX_POS - 1, 500])[:T].to(pos.dtype)
    h_inf = h.clone()
    h_inf[2, 3] = float("inf")
    return [("random", pos, h), ("large", pos, h * 100), ("inf", pos, h_inf)]


def pair_mag(x, is_neox):
    """Per element, ``|a| + |b|`` of its rotation pair: the scale of the rounding RoPE may add."""
    x = x.double().abs()
    if is_neox:
        a, b = x.chunk(2, dim=-1)
        return torch.cat((a + b, a + b), dim=-1)
    s = x[..., 0::2] + x[..., 1::2]
    return torch.stack((s, s), dim=-1).flatten(-2)


def assert_within(got, ref, tol, msg):
    """``got`` equals ``ref`` element by element within ``tol``; NaN where ``ref`` has NaN, and equal
    where ``tol`` is not finite (an inf input)."""
    got, ref = got.double(), ref.double()
    assert torch.equal(got.isnan(), ref.isnan()), f"{msg}: NaN in different places"
    tol = torch.where(torch.isfinite(tol), tol, torch.zeros_like(tol))
    err = (got - ref).abs()
    ok = (got == ref) | got.isnan() | (err <= tol)
    assert bool(ok.all()), f"{msg}: {int((~ok).sum())} elements off, max {err[~ok].max()}"


def compare(stack, module, pm, *, inputs=None, exact=False, inductor=False, dynamic=False):
    """Eager vs compiled on each input set of :func:`biting_inputs` (same caches before): the
    rotated q_pe and every written cache row must agree (NaN where eager has NaN), within the model
    dtype's rounding of the RoPE (fused: the op rounds once, eager at every step) plus one fp8 step
    for an fp8 cache; ``exact``: bit for bit (nothing fused: the compiled RoPE is eager's);
    ``"unless fused"``: bit for bit when the layer was refused. Returns the backend."""
    b = TestBackend(pm, inductor=inductor)
    compiled = torch.compile(module, backend=b, fullgraph=True, dynamic=dynamic or None)
    (state,) = stack.states.values()
    ly = module.ly
    P, L, R, H = ly.P, ly.L, ly.R, ly.H
    for name, pos, h in inputs or biting_inputs(stack):
        set_step(stack, T, seed=3, pad_every=3)
        snap = stack.snapshot_caches()
        with torch.no_grad():
            eager_out, eager_q = module(pos, h)
        eager_cache = state.kv_cache.clone()
        stack.restore_caches(snap)
        with torch.no_grad():
            out, got_q = compiled(pos, h)
        got_cache = state.kv_cache.clone()
        if exact == "unless fused":
            exact = pm.matched_counts[FUSION] == 0
        if exact:
            torch.testing.assert_close(got_q, eager_q, rtol=0, atol=0, equal_nan=True, msg=name)
            assert torch.equal(got_cache.view(torch.uint8), eager_cache.view(torch.uint8)), name
            continue
        u = torch.finfo(eager_q.dtype).eps / 2
        with torch.no_grad():
            q_in = (h @ ly.w_q).view(T, H, P + R)[..., P:]
            k_in = (h @ ly.w_kv)[:, L:]
        assert_within(got_q, eager_q, 8 * u * pair_mag(q_in, ly.is_neox), f"{name}: q_pe")
        slots = state.slot_mapping
        valid = slots >= 0
        got_rows = dequant_cache(got_cache, state)[slots[valid]]
        ref_rows = dequant_cache(eager_cache, state)[slots[valid]]
        tol = torch.zeros_like(ref_rows, dtype=torch.float64)
        tol[:, L:] = 8 * u * pair_mag(k_in[valid], ly.is_neox) * 2
        if inductor:  # Inductor's kv_c normalization rounds once, in fp32; eager's at every step
            tol[:, :L] = 4 * u * ref_rows[:, :L].abs().double()
        if state.kv_cache_dtype != "auto":  # one fp8 step at the value's magnitude
            big = torch.maximum(got_rows.abs(), ref_rows.abs()).nan_to_num(0, 0, 0)
            tol += (fp8_step(big / state.k_scale, torch.float8_e4m3fn) * state.k_scale).double() * 1.01
        assert_within(got_rows, ref_rows, tol, f"{name}: cache rows")
    return b


def fusion_of(pm):
    return next(p for p in pm.passes if p.name == FUSION)


def assert_refused(pm, b, reason):
    fusion = fusion_of(pm)
    assert pm.matched_counts == {FUSION: 0, LIFT: 1}, fusion.refusals
    assert b.count_after("mla_passes.mla_fused_decode_prep") == 0
    assert any(reason in r for r in fusion.refusals), fusion.refusals


# --- class 1: an op the random trials cannot see ----------------------------------------

def rotate(x, cos, sin, is_neox):
    """RoPE of ``x`` ([T, H, R] or [T, 1, R]) with ``cos``/``sin`` rows ([T or 1, R/2]) broadcast over heads."""
    c, s = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1) if is_neox else (x[..., ::2], x[..., 1::2])
    o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
    return torch.cat((o1, o2), dim=-1) if is_neox else torch.stack((o1, o2), dim=-1).flatten(-2)


def _after(base, *, q=None, k=None):
    """``base`` RoPE with ``q`` / ``k`` applied to the rotated q_pe / k_pe."""

    def fn(positions, q_pe, k_pe, cos_sin_cache, is_neox):
        qr, kr = base(positions, q_pe, k_pe, cos_sin_cache, is_neox)
        return (qr if q is None else q(qr)), (kr if k is None else k(kr))

    return fn


def _clip(x):
    return x.clamp(-30, 30)


EXTRA_OPS = {
    "clamp_q": (_after(_rope_native, q=_clip), "(aten.clamp"),
    "clamp_q_and_k": (_after(_rope_native, q=_clip, k=_clip), "(aten.clamp"),
    "clamp_k_deepseek": (_after(_rope_deepseek, k=_clip), "(aten.clamp"),
    "nan_to_num_q": (_after(_rope_native, q=torch.nan_to_num), "(aten."),  # decomposed: isnan, where, ...
    "maximum_q": (_after(_rope_native, q=lambda x: torch.maximum(x, torch.full_like(x, -30.0))), "(aten."),
}


@pytest.mark.parametrize("name,is_neox", [(name, i % 2 == 1) for i, name in enumerate(sorted(EXTRA_OPS))])
def test_extra_op_after_rope_refused(name, is_neox):
    """``rope(q).clamp(-30, 30)`` was fused as plain RoPE (q_pe 25% off, cache rows 17% off past +-30), and
    ``nan_to_num(rope(q))`` too (NaN where eager has 0): the random trials never reached the clip."""
    fn, op = EXTRA_OPS[name]
    stack = build_decode_stack(1, H=2, hidden=64, is_neox=is_neox, max_pos=MAX_POS)
    pm = make_pm()
    b = compare(stack, RopeLayer(stack, fn), pm, exact=True)
    assert_refused(pm, b, op)


def test_extra_op_refused_through_inductor():
    """The same under Inductor's decompositions (``clamp`` after the rotation): refused, compiled == eager
    past the clip (to the rounding of Inductor's own fp32 RoPE)."""
    fn, _ = EXTRA_OPS["clamp_q_and_k"]
    stack = build_decode_stack(1, H=2, hidden=64, max_pos=MAX_POS)
    pm = make_pm()
    b = compare(stack, RopeLayer(stack, fn), pm, inductor=True)
    assert_refused(pm, b, "not one of the operations a rotation is built from")


def test_plain_rope_in_this_harness_fused():
    """The harness fuses plain RoPE, by pattern and by the semantic check (the refusals are not blanket)."""
    for fn, semantic in ((_rope_native, 0), (_rope_deepseek, 0), (cast_rope(style="commuted"), 1)):
        torch._dynamo.reset()
        stack = build_decode_stack(1, H=2, hidden=64, max_pos=MAX_POS)
        pm = make_pm()
        compare(stack, RopeLayer(stack, fn), pm)
        assert pm.matched_counts[FUSION] == 1, fusion_of(pm).refusals
        assert fusion_of(pm).pattern_counts["rope_semantic"] == semantic
        stack.unregister()


# --- class 2: q and k read the table at different positions -----------------------------

def _clamp1(p):
    return p.clamp(min=1)


def _zero_past_1000(p):
    return torch.where(p >= 1000, 0, p)


def _positions_rope(q_pos=None, k_pos=None, *, shared=None, base=_rope_native):
    """``base`` RoPE with q's cos/sin read at ``q_pos(positions)`` and k's at ``k_pos(positions)``;
    ``shared``: both read at ONE node ``shared(positions)``."""

    def fn(positions, q_pe, k_pe, cos_sin_cache, is_neox):
        if shared is not None:
            p = shared(positions)
            return base(p, q_pe, k_pe, cos_sin_cache, is_neox)
        qp = positions if q_pos is None else q_pos(positions)
        kp = positions if k_pos is None else k_pos(positions)
        q_rot, _ = base(qp, q_pe, k_pe, cos_sin_cache, is_neox)
        _, k_rot = base(kp, q_pe, k_pe, cos_sin_cache, is_neox)
        return q_rot, k_rot

    return fn


POSITION_EDITS = {
    "q_clamp_min_1": _positions_rope(q_pos=_clamp1),
    "k_clamp_min_1": _positions_rope(k_pos=_clamp1),
    "q_where_1000": _positions_rope(q_pos=_zero_past_1000),
    "k_where_1000": _positions_rope(k_pos=_zero_past_1000),
    "k_where_1000_commuted": _positions_rope(k_pos=_zero_past_1000, base=cast_rope(style="commuted")),
    "q_clamp_min_1_deepseek": _positions_rope(q_pos=_clamp1, base=_rope_deepseek),
}


@pytest.mark.parametrize("name", sorted(POSITION_EDITS))
def test_q_and_k_at_different_positions_refused(name):
    """q read cos/sin at ``positions.clamp(min=1)`` (or ``where(positions >= 1000, 0, positions)``) and k at
    ``positions``: fused with k's positions (q_pe 14.5% / 62% off); the mirror case on k's side was fused or
    refused depending on set iteration order."""
    stack = build_decode_stack(1, H=2, hidden=64, max_pos=MAX_POS)
    pm = make_pm()
    b = compare(stack, RopeLayer(stack, POSITION_EDITS[name]), pm, exact=True)
    assert_refused(pm, b, "different positions values")


@pytest.mark.parametrize("edit", [_clamp1, _zero_past_1000])
def test_one_edited_positions_value_for_both_fused(edit):
    """q and k reading the table at ONE edited positions node is exact: fused, with that node as positions."""
    stack = build_decode_stack(1, H=2, hidden=64, max_pos=MAX_POS)
    pm = make_pm()
    b = compare(stack, RopeLayer(stack, _positions_rope(shared=edit)), pm)
    assert pm.matched_counts[FUSION] == 1, fusion_of(pm).refusals
    assert b.count_after("mla_passes.mla_fused_decode_prep") == 1


# --- class 3: operands the kernel refuses at run time ----------------------------------

@pytest.mark.parametrize("dynamic", [False, True])
def test_one_position_broadcast_refused(dynamic):
    """cos/sin gathered at ``positions[:1]`` and broadcast over the tokens was fused; the kernel then raised
    (positions must have one entry per token). With a symbolic token count too (1 against s0)."""
    def one_position(positions, q_pe, k_pe, cos_sin_cache, is_neox):
        cos, sin = cos_sin_cache.index_select(0, positions[:1]).chunk(2, dim=-1)  # [1, R/2], for every token
        return rotate(q_pe, cos, sin, is_neox), rotate(k_pe, cos, sin, is_neox)

    stack = build_decode_stack(1, H=2, hidden=64, max_pos=MAX_POS)
    pm = make_pm(no_range_policy="apply" if dynamic else "infer")  # a symbolic T has no bound to infer
    b = compare(stack, RopeLayer(stack, one_position), pm, exact=True, dynamic=dynamic)
    assert_refused(pm, b, "argument 'positions'")


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e5m2", "fp8_ds_mla"])
def test_unsupported_cache_dtype_refused(monkeypatch, kv_cache_dtype):
    """A local-registry layer with an ``fp8_e5m2`` / ``fp8_ds_mla`` cache was fused; the kernel then raised."""
    # the stand-in layer keeps such a cache in the model dtype; its attention reads it back as that
    # (vLLM's attention reads its own formats; our gather knows only the kernel's)
    real = standins.gather_cache_rows
    monkeypatch.setattr(standins, "gather_cache_rows", lambda cache, slots, dt, *a, **k: real(
        cache, slots, dt if dt in KV_CACHE_DTYPES else "auto", *a, **k))
    stack = build_decode_stack(1, H=2, hidden=64, max_pos=MAX_POS, kv_cache_dtype=kv_cache_dtype)
    pm = make_pm()
    b = compare(stack, RopeLayer(stack, _rope_native), pm, exact=True)
    assert_refused(pm, b, "argument 'kv_cache_dtype'")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_k_scale_fused_with_a_float32_copy(dtype):
    """``model.to(bf16)`` / ``model.half()`` turns the graph's k_scale into bf16/fp16: it was fused as is and
    the kernel raised (k_scale must be float32). A float32 copy is exact: fused, same cache rows."""
    stack = build_decode_stack(1, H=2, hidden=64, max_pos=MAX_POS, kv_cache_dtype="fp8", dtype=dtype)
    module = RopeLayer(stack, _rope_native).to(dtype)
    assert module.ly.k_scale.dtype == dtype
    pm = make_pm()
    b = compare(stack, module, pm)
    assert pm.matched_counts[FUSION] == 1, fusion_of(pm).refusals
    assert b.count_after("mla_passes.mla_fused_decode_prep") == 1


@pytest.mark.parametrize("inductor", [False, True])
def test_half_k_scale_fused_rope_form(inductor):
    """The same in the fused-rope form (vLLM's own RoPE + cache op carries the k_scale): a float32 copy."""
    st = build_decode_stack(1, H=4, hidden=64, form="fused_rope", kv_cache_dtype="fp8")
    module = Variant(st, form="fused_rope")
    module.k_scales = [k.to(torch.bfloat16) for k in module.k_scales]
    pm, b = run_variant(st, module, inductor=inductor)
    assert pm.matched_counts[FUSION] == 1, fusion_of(pm).refusals


def test_float64_k_scale_refused():
    """A float64 k_scale has no exact float32 copy: refused by the kernel's own rule, at compile time."""
    stack = build_decode_stack(1, H=2, hidden=64, max_pos=MAX_POS, kv_cache_dtype="fp8")
    module = RopeLayer(stack, _rope_native)
    module.ly.k_scale = module.ly.k_scale.double() / 3
    pm = make_pm()
    b = compare(stack, module, pm, exact=True)
    assert_refused(pm, b, "argument 'k_scale'")
