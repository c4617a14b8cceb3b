"""The AITER backend against a fake ``aiter`` that enforces the op's contract.

There is no ROCm machine here. The fake ``aiter.fused_qk_rope_concat_and_cache_mla``
asserts every input property the real HIP op relies on without checking
(DESIGN §5: int64 indices, cos/sin of q's dtype, contiguous ``[max_pos, R/2]``,
the platform fp8 dtype, 2-D kv_c/k_pe, unit innermost strides), then computes
the way the op does (cos/sin read in q's dtype, ``x * (1/scale)`` quant, q
rows of slot < 0 tokens only with ``compute_all_q_rope``, q_pe/k_pe left
unrotated). A conversion that the backend forgets fails an assertion here.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types

import pytest
import torch

import mla_passes.kernels as kernels
from mla_passes.kernels import aiter_prep, backends, fp8 as fp8_mod
from mla_passes.kernels.aiter_prep import fused_decode_prep_aiter
from mla_passes.kernels.fp8 import fp8_max
from mla_passes.kernels.reference import rope_fp32
from mla_passes.kernels.validate import check_fused_decode_prep_args
from mla_passes.testing import POISON, fp8_step, make_case, oracle

MODEL = (torch.bfloat16, torch.float16, torch.float32)


def make_fake_aiter(platform_fp8=torch.float8_e4m3fn, *, has_compute_all=True):
    """A stand-in ``aiter`` module; ``module.calls`` records what each call saw."""
    calls = []

    def body(q_nope, q_pe, kv_c, k_pe, kv_cache, q_out, slot_mapping, k_scale, q_scale,
             positions, cos_cache, sin_cache, is_neox, is_nope_first, compute_all_q_rope):
        T, H, L = q_nope.shape
        R = q_pe.shape[-1]
        # --- the contract (what the HIP op reads without checking it)
        assert slot_mapping.dtype == torch.int64, f"slot_mapping must be int64, got {slot_mapping.dtype}"
        assert positions.dtype == torch.int64, f"positions must be int64, got {positions.dtype}"
        assert cos_cache.dtype == q_nope.dtype and sin_cache.dtype == q_nope.dtype, \
            f"cos/sin must be {q_nope.dtype}, got {cos_cache.dtype}/{sin_cache.dtype}"
        assert cos_cache.is_contiguous() and sin_cache.is_contiguous(), "cos/sin must be contiguous"
        assert cos_cache.dim() == 2 and cos_cache.shape[1] == R // 2 and sin_cache.shape == cos_cache.shape, \
            f"cos/sin must be [max_pos, R/2={R // 2}], got {tuple(cos_cache.shape)}"
        assert q_pe.dtype == kv_c.dtype == k_pe.dtype == q_nope.dtype and q_nope.dtype in MODEL
        assert kv_c.dim() == 2 and k_pe.dim() == 2, "decode path: kv_c and k_pe both 2-D"
        assert q_pe.shape == (T, H, R) and kv_c.shape == (T, L) and k_pe.shape == (T, R)
        for name, t in (("q_nope", q_nope), ("q_pe", q_pe), ("kv_c", kv_c), ("k_pe", k_pe),
                        ("q_out", q_out), ("kv_cache", kv_cache)):
            assert t.stride(-1) == 1, f"{name} must have a unit innermost stride"
        assert kv_cache.dim() == 3 and kv_cache.shape[2] == L + R
        assert kv_cache.dtype in MODEL + (platform_fp8,), \
            f"kv_cache must be a model dtype or {platform_fp8}, got {kv_cache.dtype}"
        fp8_cache = kv_cache.dtype == platform_fp8
        assert fp8_cache or kv_cache.dtype == kv_c.dtype
        assert q_out.shape == (T, H, L + R)
        assert q_out.dtype in (q_nope.dtype, platform_fp8), f"q_out dtype {q_out.dtype}"
        assert fp8_cache or q_out.dtype != platform_fp8, "fp8 q_out with a non-fp8 cache is rejected"
        for s in (k_scale, q_scale):
            assert isinstance(s, torch.Tensor) and s.dtype == torch.float32 and s.numel() == 1
        assert is_nope_first is True
        if compute_all_q_rope:
            per_head = kv_cache.shape[1] == 1 and T < 256
            assert L == 512 and R == 64 and (per_head or L * H >= 2048), \
                "compute_all_q_rope outside the per-head/opt kernels"
        calls.append(dict(block_size=kv_cache.shape[1], compute_all=compute_all_q_rope,
                          q_out_dtype=q_out.dtype, cache_dtype=kv_cache.dtype))
        # --- the computation, as the op does it
        pos = positions.clamp(0, cos_cache.shape[0] - 1)
        cos, sin = cos_cache[pos].float(), sin_cache[pos].float()
        rows = torch.cat((q_nope.float(), rope_fp32(q_pe, cos[:, None], sin[:, None], is_neox)), dim=-1)
        if q_out.dtype == platform_fp8:
            m = fp8_max(platform_fp8)
            rows = (rows * (1.0 / q_scale.float())).clamp(-m, m)
        write = torch.ones(T, dtype=torch.bool) if compute_all_q_rope else slot_mapping >= 0
        q_out[write] = rows[write].to(q_out.dtype)
        valid = slot_mapping >= 0
        kv = torch.cat((kv_c.float(), rope_fp32(k_pe, cos, sin, is_neox)), dim=-1)[valid]
        if fp8_cache:
            m = fp8_max(platform_fp8)
            kv = (kv * (1.0 / k_scale.float())).clamp(-m, m)
        slots = slot_mapping[valid]
        bs = kv_cache.shape[1]
        kv_cache[slots // bs, slots % bs] = kv.to(kv_cache.dtype)

    if has_compute_all:
        def fused_qk_rope_concat_and_cache_mla(q_nope, q_pe, kv_c, k_pe, kv_cache, q_out, slot_mapping,
                                               k_scale, q_scale, positions, cos_cache, sin_cache,
                                               is_neox, is_nope_first, compute_all_q_rope=False):
            body(q_nope, q_pe, kv_c, k_pe, kv_cache, q_out, slot_mapping, k_scale, q_scale,
                 positions, cos_cache, sin_cache, is_neox, is_nope_first, compute_all_q_rope)
    else:
        def fused_qk_rope_concat_and_cache_mla(q_nope, q_pe, kv_c, k_pe, kv_cache, q_out, slot_mapping,
                                               k_scale, q_scale, positions, cos_cache, sin_cache,
                                               is_neox, is_nope_first):
            body(q_nope, q_pe, kv_c, k_pe, kv_cache, q_out, slot_mapping, k_scale, q_scale,
                 positions, cos_cache, sin_cache, is_neox, is_nope_first, False)

    mod = types.ModuleType("aiter")
    mod.fused_qk_rope_concat_and_cache_mla = fused_qk_rope_concat_and_cache_mla
    mod.calls = calls
    return mod


@pytest.fixture
def fake_aiter(monkeypatch):
    accepts = aiter_prep._accepts_compute_all_q_rope  # cached per op function

    def install(**kw):
        mod = make_fake_aiter(**kw)
        monkeypatch.setitem(sys.modules, "aiter", mod)
        accepts.cache_clear()
        return mod

    yield install
    accepts.cache_clear()


def _tol(dtype):
    return {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-4}[dtype]


def check_case(case, run, *, cache_fp8=None):
    """Run ``run(case)`` and check q_out (every row), the in-place rotations and
    the cache (written rows right, all other rows untouched) against the oracle.
    ``cache_fp8``: the fp8 flavour a uint8 cache holds (default: the platform's).
    Works on any device; used by the Triton tests too."""
    exp = oracle(case)
    before = case.clone()
    run(case)
    P, R = case.meta["P"], case.meta["R"]
    T = case.q.shape[0]
    tol = _tol(case.meta["dtype"])
    assert not (case.q_out.float() == POISON).all(dim=-1).any(), "a q_out row was left unwritten"
    if case.q_scale is not None:
        # one fp8 step, plus the model-dtype tolerance (relative, and absolute in q units)
        qs = case.q_scale.double()
        m = fp8_max(case.q_out.dtype)
        ref = (exp.q_cat / qs).clamp(-m, m)
        err = (case.q_out.double() - ref).abs()
        assert (err <= fp8_step(ref, case.q_out.dtype) + tol * ref.abs() + tol / qs).all(), err.max()
    else:
        torch.testing.assert_close(case.q_out.double(), exp.q_cat, rtol=tol, atol=tol)
    torch.testing.assert_close(case.q[..., P:].double(), exp.q_pe_rot, rtol=tol, atol=tol)
    assert torch.equal(case.q[..., :P], before.q[..., :P])
    torch.testing.assert_close(case.k_pe.reshape(T, R).double(), exp.k_pe_rot, rtol=tol, atol=tol)
    assert torch.equal(case.kv_c, before.kv_c)

    D = case.kv_cache.shape[-1]
    flat = case.kv_cache.view(-1, D)
    valid = case.slot_mapping >= 0
    slots = case.slot_mapping[valid].long()
    if case.kv_cache_dtype == "auto":
        torch.testing.assert_close(flat[slots].double(), exp.cache_rows[valid], rtol=tol, atol=tol)
    else:
        fl = flat.dtype if flat.dtype != torch.uint8 else (cache_fp8 or fp8_mod.platform_fp8_dtype(flat.device))
        ks = case.k_scale.double()
        ref = (exp.cache_rows[valid] / ks).clamp(-fp8_max(fl), fp8_max(fl))
        got = flat.view(fl)[slots].double()
        assert ((got - ref).abs() <= fp8_step(ref, fl) + tol * ref.abs() + tol / ks).all()
    untouched = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
    untouched[slots] = False
    before_flat = before.kv_cache.view(-1, D)
    assert torch.equal(flat[untouched].view(torch.uint8), before_flat[untouched].view(torch.uint8))


def _run_aiter(case):
    dims = check_fused_decode_prep_args(*case.kernel_args())
    fused_decode_prep_aiter(*case.kernel_args(), dims)


CONFIGS = [
    # dtype, kv_cache_dtype, cache flavour (None: uint8 bits), q fp8, is_neox, k_pe_3d, block_size, int32 idx
    (torch.bfloat16, "fp8", None, True, True, False, 16, False),
    (torch.bfloat16, "fp8", torch.float8_e4m3fn, True, False, True, 1, True),
    (torch.float16, "fp8", None, False, True, True, 64, True),
    (torch.bfloat16, "auto", None, False, False, False, 16, False),
    (torch.float16, "auto", None, True, True, False, 1, True),     # fp8 q + bf16 cache: quantized here
    (torch.bfloat16, "fp8", None, True, True, False, 1, False),
]


@pytest.mark.parametrize("dtype,kvd,flavour,q_fp8,is_neox,k_pe_3d,block_size,int32", CONFIGS)
def test_contract_and_numbers(fake_aiter, dtype, kvd, flavour, q_fp8, is_neox, k_pe_3d, block_size, int32):
    """Every conversion DESIGN §5 lists reaches the op; results match the float64 oracle."""
    fake = fake_aiter()
    case = make_case(7, 4, P=32, L=512, R=64, block_size=block_size, dtype=dtype, kv_cache_dtype=kvd,
                     cache_fp8_dtype=flavour, q_fp8_dtype=torch.float8_e4m3fn if q_fp8 else None,
                     is_neox=is_neox, k_pe_3d=k_pe_3d, seed=block_size + 3 * int32)
    if int32:
        case.positions, case.slot_mapping = case.positions.int(), case.slot_mapping.int()
    check_case(case, _run_aiter)
    (call,) = fake.calls
    assert call["block_size"] == 1, "the block-size-1 cache view was not used"
    assert call["compute_all"] is True
    assert call["cache_dtype"] == (case.kv_cache.dtype if kvd == "auto" else torch.float8_e4m3fn)
    if q_fp8 and kvd == "auto":
        assert call["q_out_dtype"] == dtype  # the op has no fp8 q with a bf16 cache


def test_aiter_without_compute_all_q_rope(fake_aiter):
    """An AITER that leaves q rows of slot<0 tokens unwritten: the backend writes them."""
    fake = fake_aiter(has_compute_all=False)
    case = make_case(9, 4, P=32, L=512, R=64, dtype=torch.bfloat16, kv_cache_dtype="fp8",
                     q_fp8_dtype=torch.float8_e4m3fn, pad_every=2, seed=4)
    check_case(case, _run_aiter)
    assert fake.calls[0]["compute_all"] is False


def test_dims_outside_all_rows_kernels(fake_aiter):
    """L/R other than 512/64: no compute_all_q_rope (AITER would reject it); rows still written."""
    fake = fake_aiter()
    case = make_case(6, 4, P=16, L=64, R=16, dtype=torch.float16, q_fp8_dtype=None, seed=8)
    check_case(case, _run_aiter)
    assert fake.calls[0]["compute_all"] is False


def test_gfx94x_uint8_cache_is_viewed_as_fnuz(fake_aiter, monkeypatch):
    """On gfx94x the uint8 cache holds e4m3fnuz bits and q_out is e4m3fnuz."""
    fnuz = torch.float8_e4m3fnuz
    fake = fake_aiter(platform_fp8=fnuz)
    monkeypatch.setattr(aiter_prep, "platform_fp8_dtype", lambda device=None: fnuz)
    case = make_case(5, 4, P=32, L=512, R=64, dtype=torch.bfloat16, kv_cache_dtype="fp8",
                     cache_fp8_dtype=fnuz, q_fp8_dtype=fnuz, seed=6)
    case.kv_cache = case.kv_cache.view(torch.uint8)
    check_case(case, _run_aiter, cache_fp8=fnuz)
    assert fake.calls[0]["cache_dtype"] == fnuz and fake.calls[0]["q_out_dtype"] == fnuz


def test_other_fp8_flavour_falls_back_with_a_warning(fake_aiter, caplog):
    """A cache of the non-platform fp8 flavour never reaches AITER; the next backend runs."""
    fake = fake_aiter()
    aiter_prep._warn_unsupported_once.cache_clear()
    case = make_case(5, 4, P=32, L=512, R=64, kv_cache_dtype="fp8", cache_fp8_dtype=torch.float8_e4m3fnuz,
                     q_fp8_dtype=torch.float8_e4m3fnuz, seed=2)
    with caplog.at_level("WARNING", logger="mla_passes.kernels.aiter_prep"):
        check_case(case, _run_aiter)
    assert fake.calls == []
    assert any("cannot take this call" in r.getMessage() for r in caplog.records)


def test_dispatcher_runs_the_aiter_backend(fake_aiter, monkeypatch):
    """fused_decode_prep(backend='aiter') reaches the op where AITER is available."""
    fake = fake_aiter()
    aiter_row = dataclasses.replace(backends.BY_NAME["aiter"], available=lambda device: True)
    monkeypatch.setitem(backends.BY_NAME, "aiter", aiter_row)
    case = make_case(4, 4, P=32, L=512, R=64, kv_cache_dtype="fp8", q_fp8_dtype=torch.float8_e4m3fn, seed=9)
    check_case(case, lambda c: kernels.fused_decode_prep(*c.kernel_args(), backend="aiter"))
    assert len(fake.calls) == 1


def _identity_cos_sin(cos_sin_cache, dtype):
    half = cos_sin_cache.shape[1] // 2
    return cos_sin_cache[:, :half], cos_sin_cache[:, half:]


PLANTED = [
    ("index64", lambda t: t, "int64"),                               # int32 slots passed through
    ("split_cos_sin", _identity_cos_sin, "cos/sin must be"),         # fp32, strided cos/sin
    ("cache_view", lambda c, kvd: c, "kv_cache must be"),            # uint8 cache not viewed
    ("k_pe_2d", lambda k: k, "both 2-D"),                            # [T,1,R] k_pe passed through
]


@pytest.mark.parametrize("name,bad,message", PLANTED, ids=[p[0] for p in PLANTED])
def test_planted_wrong_conversion_is_caught(fake_aiter, monkeypatch, name, bad, message):
    """Each contract conversion, removed on purpose, makes the fake op fail."""
    fake_aiter()
    monkeypatch.setattr(aiter_prep, name, bad)
    case = make_case(5, 4, P=32, L=512, R=64, dtype=torch.bfloat16, kv_cache_dtype="fp8",
                     q_fp8_dtype=torch.float8_e4m3fn, k_pe_3d=True, seed=1)
    case.positions, case.slot_mapping = case.positions.int(), case.slot_mapping.int()
    with pytest.raises(AssertionError, match=message):
        _run_aiter(case)


def test_planted_missing_pad_rows_is_caught(fake_aiter, monkeypatch):
    """The checker itself: an AITER without compute_all_q_rope and no fix-up leaves poison rows."""
    fake_aiter(has_compute_all=False)
    monkeypatch.setattr(aiter_prep, "_accepts_compute_all_q_rope", lambda fn: True)
    case = make_case(6, 4, P=32, L=512, R=64, kv_cache_dtype="fp8", q_fp8_dtype=torch.float8_e4m3fn, seed=3)
    with pytest.raises(TypeError):
        _run_aiter(case)  # the old op has no such argument: passing it blindly fails loudly
    # and without the argument and without the fix-up, the checker sees the unwritten rows
    monkeypatch.setattr(aiter_prep, "_accepts_compute_all_q_rope", lambda fn: False)
    monkeypatch.setattr(aiter_prep, "write_pad_rows", lambda q_dst, rows, slots: None)
    with pytest.raises(AssertionError, match="unwritten"):
        check_case(make_case(6, 4, P=32, L=512, R=64, kv_cache_dtype="fp8",
                             q_fp8_dtype=torch.float8_e4m3fn, seed=3), _run_aiter)


def test_aiter_is_imported_only_when_the_backend_runs():
    """Importing the package and the backend module does not import aiter."""
    code = ("import sys, mla_passes.kernels, mla_passes.kernels.aiter_prep; "
            "assert 'aiter' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cos_sin_split_not_stale_when_memory_is_reused():
    """The split cos/sin was keyed on data_ptr()/_version: a new table at the
    same address (a freed tensor's memory reused) got the old table's split."""
    import numpy as np

    mem = np.zeros((8, 4), dtype=np.float32)
    mem[:] = 1.0
    old = torch.from_numpy(mem)
    cos_old, _ = aiter_prep.split_cos_sin(old, torch.float32)
    assert (cos_old == 1.0).all()
    ptr = old.data_ptr()
    del old
    mem[:] = 2.0  # new contents, written behind torch's back (no version bump)
    new = torch.from_numpy(mem)
    assert new.data_ptr() == ptr and new._version == 0
    cos_new, sin_new = aiter_prep.split_cos_sin(new, torch.float32)
    assert (cos_new == 2.0).all() and (sin_new == 2.0).all()


def test_cos_sin_split_is_reused_and_follows_in_place_updates():
    """Steady state: the same table gives the cached split; an in-place update refreshes it."""
    table = torch.randn(16, 8)
    a = aiter_prep.split_cos_sin(table, torch.bfloat16)
    assert aiter_prep.split_cos_sin(table, torch.bfloat16)[0] is a[0]
    table.mul_(2)
    b = aiter_prep.split_cos_sin(table, torch.bfloat16)
    torch.testing.assert_close(b[0].float(), table[:, :4].bfloat16().float())
