"""The reference backend against an independent float64 formulation (DESIGN §4.1)."""

from __future__ import annotations

import itertools

import pytest
import torch

from mla_passes.kernels import fused_decode_prep, gather_cache_rows
from mla_passes.kernels.fp8 import fp8_max, platform_fp8_dtype
from mla_passes.testing import POISON, fp8_step, make_case, oracle

FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def _model_tol(dtype):
    return {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]


def _check_case(case, *, backend="reference"):
    """Run the kernel on ``case`` and check every output against the oracle."""
    exp = oracle(case)
    before = case.clone()
    fused_decode_prep(*case.kernel_args(), backend=backend)
    T = case.q.shape[0]
    P, R = case.meta["P"], case.meta["R"]
    rtol = _model_tol(case.meta["dtype"])

    # q_out: every row written
    if case.q_scale is not None:
        ref = (exp.q_cat / case.q_scale.double()).clamp(-fp8_max(case.q_out.dtype), fp8_max(case.q_out.dtype))
        got = case.q_out.double()
        step = fp8_step(ref, case.q_out.dtype)
        # within one fp8 step, plus the model-dtype rounding of the inputs
        assert ((got - ref).abs() <= step + rtol * ref.abs() + 1e-3).all()
    else:
        torch.testing.assert_close(case.q_out.double(), exp.q_cat, rtol=rtol, atol=rtol)
    assert not (case.q_out.float() == POISON).all(dim=-1).any(), "a q_out row was left unwritten"

    # in-place rotation, nope part untouched
    torch.testing.assert_close(case.q[..., P:].double(), exp.q_pe_rot, rtol=rtol, atol=rtol)
    assert torch.equal(case.q[..., :P], before.q[..., :P])
    torch.testing.assert_close(case.k_pe.reshape(T, R).double(), exp.k_pe_rot, rtol=rtol, atol=rtol)
    assert torch.equal(case.kv_c, before.kv_c)

    # cache rows: written where slot >= 0, read back through gather_cache_rows
    rows = gather_cache_rows(case.kv_cache, case.slot_mapping, case.kv_cache_dtype, case.k_scale, dtype=torch.float32)
    valid = case.slot_mapping >= 0
    assert (rows[~valid] == 0).all()
    expect = exp.cache_rows[valid]
    if case.kv_cache_dtype == "auto":
        torch.testing.assert_close(rows[valid].double(), expect, rtol=rtol, atol=rtol)
    else:
        fl = case.kv_cache.dtype if case.kv_cache.dtype in FP8 else platform_fp8_dtype(case.kv_cache.device)
        ks = case.k_scale.double()
        err = (rows[valid].double() - expect.clamp(-fp8_max(fl) * ks, fp8_max(fl) * ks)).abs()
        assert (err <= fp8_step(expect / ks, fl) * ks + rtol * expect.abs() + 1e-3).all()

    # every other cache row still holds the poison, bit for bit
    flat_after = case.kv_cache.view(-1, case.kv_cache.shape[-1])
    flat_before = before.kv_cache.view(-1, before.kv_cache.shape[-1])
    untouched = torch.ones(flat_after.shape[0], dtype=torch.bool)
    untouched[case.slot_mapping[valid].long()] = False
    assert torch.equal(flat_after[untouched].view(torch.uint8), flat_before[untouched].view(torch.uint8))
    return case


GRID = list(itertools.product(
    [1, 3, 16, 64, 256],              # T
    [16, 128],                        # H
    [1, 16, 64],                      # block size
))


@pytest.mark.parametrize("T,H,block_size", GRID)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grid_bf16_cache(T, H, block_size, dtype):
    """Reference matches float64 over the T/H/block-size grid with a model-dtype cache."""
    case = make_case(T, H, P=32, L=64, R=16, block_size=block_size, dtype=dtype,
                     is_neox=(T + H) % 2 == 0, seed=T * 1000 + H + block_size)
    _check_case(case)


@pytest.mark.parametrize("T,H,block_size", GRID)
@pytest.mark.parametrize("flavour", FP8)
@pytest.mark.parametrize("cache_as_uint8", [True, False])
def test_grid_fp8(T, H, block_size, flavour, cache_as_uint8):
    """fp8 cache (uint8 bits or an fp8 dtype) and fp8 q in both flavours."""
    case = make_case(T, H, P=32, L=64, R=16, block_size=block_size, dtype=torch.bfloat16,
                     kv_cache_dtype="fp8", cache_fp8_dtype=None if cache_as_uint8 else flavour,
                     q_fp8_dtype=flavour, is_neox=T % 2 == 1, seed=T + 7 * H + block_size)
    _check_case(case)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("kv_cache_dtype,q_fp8", [("auto", None), ("fp8", torch.float8_e4m3fn)])
def test_deepseek_v3_dims(is_neox, kv_cache_dtype, q_fp8):
    """Full DeepSeek-V3 dims (P=128, L=512, R=64), strided views, [T,1,R] k_pe."""
    case = make_case(16, 16, block_size=64, kv_cache_dtype=kv_cache_dtype, q_fp8_dtype=q_fp8,
                     is_neox=is_neox, k_pe_3d=True, seed=3)
    _check_case(case)


@pytest.mark.parametrize("is_neox", [True, False])
def test_rope_by_hand(is_neox):
    """A rotation small enough to write down: R=4, one token, angle pi/2 on pair 0."""
    T, H, P, L, R = 1, 1, 2, 2, 4
    case = make_case(T, H, P, L, R, dtype=torch.float32, block_size=1, num_blocks=2, pad_every=0,
                     strided=False, is_neox=is_neox)
    # cos/sin for position 0: pair 0 rotates by 90 degrees, pair 1 by 0 degrees
    case.cos_sin_cache = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    case.positions = torch.zeros(1, dtype=torch.int64)
    case.q[0, 0, P:] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    case.k_pe[0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    case.slot_mapping = torch.tensor([1])
    fused_decode_prep(*case.kernel_args(), backend="reference")
    if is_neox:   # pairs (0,2) rotated by 90 deg: (1,3) -> (-3,1); (1,3) by 0 deg: (2,4) -> (2,4)
        expected = [-3.0, 2.0, 1.0, 4.0]
    else:         # pairs (0,1) by 90 deg: (1,2) -> (-2,1); (2,3) by 0 deg: (3,4) -> (3,4)
        expected = [-2.0, 1.0, 3.0, 4.0]
    assert case.q[0, 0, P:].tolist() == expected
    assert case.k_pe[0].tolist() == expected
    assert case.q_out[0, 0, L:].tolist() == expected
    assert case.kv_cache[1, 0, L:].tolist() == expected


def test_fp8_quant_rounds_half_to_even_and_clamps():
    """q-quant clamps to the finite max and rounds ties to even."""
    T, H, P, L, R = 1, 1, 2, 4, 2
    case = make_case(T, H, P, L, R, dtype=torch.float32, q_fp8_dtype=torch.float8_e4m3fn,
                     pad_every=0, strided=False)
    case.q_scale = torch.tensor([1.0])
    case.w_uk_t = torch.eye(P, L).unsqueeze(0)  # ql_nope = [q0, q1, 0, 0]
    # 1.0625 is halfway between 1.0 and 1.125 (e4m3 step at 1 is 1/8): ties to even -> 1.0
    # 1.1875 is halfway between 1.125 and 1.25 -> 1.25 (even mantissa)
    case.q[0, 0, :P] = torch.tensor([1.0625, 1.1875])
    case.q[0, 0, P:] = torch.tensor([1000.0, -1000.0])
    case.positions = torch.zeros(1, dtype=torch.int64)
    fused_decode_prep(*case.kernel_args(), backend="reference")
    out = case.q_out.float()[0, 0]
    assert out[:2].tolist() == [1.0, 1.25]
    assert out[L:].tolist() == [448.0, -448.0]  # position 0: no rotation, clamped


def test_gather_cache_rows_is_static_shape_and_zero_for_padding():
    """gather_cache_rows: shape follows slots, -1 rows are zeros, dequantized by k_scale."""
    case = make_case(8, 4, P=8, L=16, R=8, kv_cache_dtype="fp8", block_size=4, seed=5)
    fused_decode_prep(*case.kernel_args(), backend="reference")
    slots = torch.tensor([-1, case.slot_mapping[1].item(), -1])
    rows = gather_cache_rows(case.kv_cache, slots, "fp8", case.k_scale)
    assert rows.shape == (3, 24) and rows.dtype == torch.bfloat16
    assert (rows[0] == 0).all() and (rows[2] == 0).all()
    raw = case.kv_cache.view(platform_fp8_dtype("cpu")).view(-1, 24)[slots[1]].float() * case.k_scale
    torch.testing.assert_close(rows[1].float(), raw, rtol=1e-2, atol=1e-2)


def test_int32_indices_match_int64():
    """int32 positions/slots give the same result as int64."""
    a = make_case(9, 4, P=16, L=32, R=8, seed=11)
    b = a.clone()
    b.positions = b.positions.int()
    b.slot_mapping = b.slot_mapping.int()
    fused_decode_prep(*a.kernel_args(), backend="reference")
    fused_decode_prep(*b.kernel_args(), backend="reference")
    assert torch.equal(a.q_out, b.q_out) and torch.equal(a.kv_cache, b.kv_cache) and torch.equal(a.q, b.q)


def test_auto_backend_on_cpu_is_reference():
    """backend='auto' picks the reference on CPU and gives its exact result."""
    from mla_passes.kernels import resolve_backend

    assert resolve_backend("auto", "cpu") == "reference"
    a = make_case(4, 4, P=16, L=32, R=8, seed=2)
    b = a.clone()
    fused_decode_prep(*a.kernel_args(), backend="auto")
    fused_decode_prep(*b.kernel_args(), backend="reference")
    assert torch.equal(a.q_out, b.q_out) and torch.equal(a.kv_cache, b.kv_cache)


def test_unavailable_backend_falls_back_with_one_warning(caplog):
    """Asking for triton/aiter on CPU falls back to the reference with a single warning."""
    from mla_passes.kernels import _warn_fallback_once, resolve_backend

    _warn_fallback_once.cache_clear()
    with caplog.at_level("WARNING", logger="mla_passes.kernels"):
        assert resolve_backend("aiter", "cpu") == "reference"
        assert resolve_backend("aiter", "cpu") == "reference"
    assert sum("not available" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("kvd", ["auto", "fp8"])
def test_strided_kv_cache_view(kvd):
    """A kv_cache that is a strided view (every other block of a bigger buffer)
    failed inside .view(); now written through its strides, gaps untouched."""
    from mla_passes.kernels.reference import fused_decode_prep_reference
    from mla_passes.kernels.validate import check_fused_decode_prep_args
    from mla_passes.testing import oracle as oracle64

    case = make_case(9, 2, P=16, L=32, R=8, block_size=4, kv_cache_dtype=kvd, q_fp8_dtype=None, seed=4)
    big = torch.cat([case.kv_cache, case.kv_cache], dim=0)  # poisoned, 2x the blocks
    case.kv_cache = big[::2]
    assert not case.kv_cache.is_contiguous()
    gaps = big[1::2].clone()
    exp = oracle64(case)
    fused_decode_prep_reference(*case.kernel_args(), check_fused_decode_prep_args(*case.kernel_args()))
    assert torch.equal(big[1::2], gaps), "a write landed between the blocks of the view"
    rows = gather_cache_rows(case.kv_cache, case.slot_mapping, kvd, case.k_scale, dtype=torch.float32)
    valid = case.slot_mapping >= 0
    want = exp.cache_rows[valid]
    if kvd == "fp8":
        fl = platform_fp8_dtype("cpu")
        ks = case.k_scale.double()
        assert ((rows[valid].double() - want).abs() <= fp8_step(want / ks, fl) * ks + 1e-2 * want.abs() + 1e-3).all()
    else:
        torch.testing.assert_close(rows[valid].double(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("q8,kvd", [(torch.float8_e4m3fn, "fp8"), (None, "auto"), (torch.float8_e4m3fnuz, "fp8")])
def test_nan_propagates(q8, kvd):
    """NaN in q or kv_c comes out as NaN (the Triton kernel gave -448; backends agree on NaN)."""
    case = make_case(4, 2, P=16, L=32, R=8, kv_cache_dtype=kvd, q_fp8_dtype=q8, pad_every=0, seed=6)
    case.q[0, 0, 2] = float("nan")
    case.kv_c[1, 3] = float("nan")
    fused_decode_prep(*case.kernel_args(), backend="reference")
    assert case.q_out[0, 0, :32].float().isnan().all() and not case.q_out[1:].float().isnan().any()
    rows = gather_cache_rows(case.kv_cache, case.slot_mapping, kvd, case.k_scale, dtype=torch.float32)
    assert rows[1, 3].isnan() and rows.isnan().sum() == 1
