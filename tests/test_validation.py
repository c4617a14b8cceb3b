"""Bad inputs raise errors that name the offending argument."""

from __future__ import annotations

import pytest
import torch

from mla_passes.kernels import fused_decode_prep, gather_cache_rows
from mla_passes.testing import make_case


def _call(case, **over):
    args = dict(zip(
        ["q", "kv_c", "k_pe", "w_uk_t", "positions", "cos_sin_cache", "is_neox", "slot_mapping",
         "kv_cache", "kv_cache_dtype", "k_scale", "q_scale", "q_out"],
        case.kernel_args(),
    ))
    args.update(over)
    fused_decode_prep(**args, backend="reference")


@pytest.fixture
def case():
    return make_case(4, 2, P=8, L=16, R=8, seed=1)


@pytest.fixture
def fp8_case():
    return make_case(4, 2, P=8, L=16, R=8, kv_cache_dtype="fp8", q_fp8_dtype=torch.float8_e4m3fn, seed=1)


BAD = {
    # wrong ranks
    "q": lambda c: dict(q=c.q.reshape(4, -1)),
    "w_uk_t": lambda c: dict(w_uk_t=c.w_uk_t[0]),
    "kv_cache": lambda c: dict(kv_cache=c.kv_cache.view(-1, c.kv_cache.shape[-1])),
    "positions": lambda c: dict(positions=c.positions[:, None]),
    # mismatched H / P / L / R
    "w_uk_t ": lambda c: dict(w_uk_t=torch.randn(3, 8, 16, dtype=c.q.dtype)),          # H
    "kv_c": lambda c: dict(kv_c=torch.randn(4, 12, dtype=c.q.dtype)),                  # L
    "k_pe": lambda c: dict(k_pe=torch.randn(4, 6, dtype=c.q.dtype)),                   # R
    "cos_sin_cache": lambda c: dict(cos_sin_cache=c.cos_sin_cache[:, :6]),             # R
    "q_out": lambda c: dict(q_out=torch.empty(4, 2, 20, dtype=c.q.dtype)),             # L+R
    "slot_mapping": lambda c: dict(slot_mapping=c.slot_mapping[:3]),                   # T
    # non-integer indices
    "positions ": lambda c: dict(positions=c.positions.float()),
    "slot_mapping ": lambda c: dict(slot_mapping=c.slot_mapping.float()),
    # cache dtype vs kv_cache_dtype
    "kv_cache  ": lambda c: dict(kv_cache=c.kv_cache.view(torch.uint8)[..., ::2].contiguous().view(torch.uint8)),
    "kv_cache_dtype": lambda c: dict(kv_cache_dtype="int8"),
    "kv_cache   ": lambda c: dict(kv_cache=c.kv_cache.half() if c.kv_cache.dtype == torch.bfloat16 else c.kv_cache.bfloat16()),
    # q_out dtype when q is not quantized
    "q_out ": lambda c: dict(q_out=c.q_out.to(torch.float8_e4m3fn)),
    "k_scale": lambda c: dict(k_scale=torch.ones(2)),
    "is_neox": lambda c: dict(is_neox=1),
}


@pytest.mark.parametrize("arg", list(BAD))
def test_bad_argument_is_named(case, arg):
    """Each bad argument raises ValueError naming it."""
    with pytest.raises(ValueError, match=f"'{arg.strip()}'"):
        _call(case, **BAD[arg](case))


def test_fp8_cache_must_be_uint8_or_fp8(fp8_case):
    """kv_cache_dtype='fp8' with a bf16 cache names kv_cache."""
    with pytest.raises(ValueError, match="'kv_cache'.*uint8"):
        _call(fp8_case, kv_cache=torch.zeros(fp8_case.kv_cache.shape, dtype=torch.bfloat16))


def test_quantized_q_needs_fp8_q_out(fp8_case):
    """q_scale given with a bf16 q_out names q_out."""
    with pytest.raises(ValueError, match="'q_out'.*fp8"):
        _call(fp8_case, q_out=torch.empty(fp8_case.q_out.shape, dtype=torch.bfloat16))


def test_auto_cache_rejects_uint8(case):
    """kv_cache_dtype='auto' with a uint8 cache names kv_cache and hints at fp8."""
    with pytest.raises(ValueError, match="'kv_cache'.*kv_cache_dtype='fp8'"):
        _call(case, kv_cache=case.kv_cache.view(torch.uint8))


def test_unknown_backend_is_named(case):
    with pytest.raises(ValueError, match="'backend'"):
        fused_decode_prep(*case.kernel_args(), backend="cuda")


def test_gather_rejects_float_slots(case):
    with pytest.raises(ValueError, match="'slots'"):
        gather_cache_rows(case.kv_cache, case.slot_mapping.float(), "auto", case.k_scale)


def test_bad_call_leaves_outputs_untouched(case):
    """Validation runs before any write: a rejected call changes nothing."""
    before = case.clone()
    with pytest.raises(ValueError):
        _call(case, slot_mapping=case.slot_mapping.float())
    assert torch.equal(case.q, before.q) and torch.equal(case.kv_cache, before.kv_cache)
    assert torch.equal(case.q_out, before.q_out) and torch.equal(case.k_pe, before.k_pe)


def test_q_out_overlapping_q_is_rejected(case):
    """q_out sharing memory with q was accepted (Triton then computed garbage)."""
    T, H, D = case.q_out.shape
    buf = torch.empty(T * H * D + case.q.numel(), dtype=case.q.dtype)
    q = buf[: case.q.numel()].view(case.q.shape).copy_(case.q)
    q_out = buf[case.q.numel() // 2: case.q.numel() // 2 + T * H * D].view(T, H, D)
    with pytest.raises(ValueError, match="'q_out'.*overlap 'q'"):
        _call(case, q=q, q_out=q_out)


def test_kv_cache_overlapping_kv_c_is_rejected(case):
    """A cache whose memory holds kv_c is written while kv_c is read: rejected."""
    flat = case.kv_cache.view(-1)
    with pytest.raises(ValueError, match="'kv_cache'.*overlap 'kv_c'"):
        _call(case, kv_c=flat[: case.kv_c.numel()].view(case.kv_c.shape))


def test_adjacent_views_of_one_buffer_are_accepted(case):
    """q_out and q as disjoint slices of one buffer are fine (no false overlap)."""
    T, H, D = case.q_out.shape
    buf = torch.empty(case.q.numel() + T * H * D, dtype=case.q.dtype)
    q = buf[: case.q.numel()].view(case.q.shape).copy_(case.q)
    q_out = buf[case.q.numel():].view(T, H, D)
    _call(case, q=q, q_out=q_out)
    assert not q_out.isnan().any() and not (q_out == 7.0).all()


@pytest.mark.parametrize("name", ["k_scale", "q_scale"])
def test_scale_on_another_device_is_named(fp8_case, name):
    """A scale on another device failed inside Triton ('Pointer argument (at 8)')."""
    bad = torch.empty(1, dtype=torch.float32, device="meta")
    with pytest.raises(ValueError, match=f"'{name}'.*device"):
        _call(fp8_case, **{name: bad})


@pytest.mark.parametrize("arg,value", [("positions", 4096), ("positions", -1), ("slot_mapping", 10**6)])
def test_reference_names_out_of_range_index(case, arg, value):
    """Out-of-range slots/positions raised torch's IndexError, naming no argument."""
    bad = getattr(case, arg).clone()
    bad[1] = value
    with pytest.raises(ValueError, match=f"'{arg}'"):
        _call(case, **{arg: bad})


def test_index_checks_run_before_any_backend(case, monkeypatch):
    """MLA_PASSES_CHECK_INDICES=1 checks index values before the backend runs."""
    import mla_passes.kernels as kernels

    def must_not_run(*a):
        raise AssertionError("the backend ran on out-of-range indices")

    monkeypatch.setattr(kernels, "implementation", lambda name: must_not_run)
    bad = case.slot_mapping.clone()
    bad[0] = 10**6
    with pytest.raises(AssertionError, match="backend ran"):  # off by default: the backend decides
        _call(case, slot_mapping=bad)
    monkeypatch.setenv("MLA_PASSES_CHECK_INDICES", "1")
    with pytest.raises(ValueError, match="'slot_mapping'"):
        _call(case, slot_mapping=bad)
