"""The Triton backend: one kernel for the whole decode prep (DESIGN §4.1).

Two halves:

* CPU (CI): the kernel under Triton's interpreter (``TRITON_INTERPRET=1``) on
  small shapes, against the float64 oracle. The interpreter must be switched
  on before ``triton_prep`` decorates its kernels, so these cases run in ONE
  subprocess (``_interp_results``) and each test reads its own verdict.
* GPU (``@pytest.mark.gpu``, skipped without CUDA): parity over the
  H/T/block-size grid with bf16 and fp16 models, auto and fp8 caches, NeoX
  and GPT-J, fp8 and unquantized q; CUDA-graph capture and replay with new
  inputs and no allocation; guard bands around q_out and the cache.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import traceback

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_aiter_backend import check_case  # noqa: E402  (one checker for every backend)

from mla_passes.kernels.fp8 import FP8_DTYPES, platform_fp8_dtype  # noqa: E402
from mla_passes.kernels.reference import gather_cache_rows_reference  # noqa: E402
from mla_passes.kernels.validate import check_fused_decode_prep_args  # noqa: E402
from mla_passes.testing import POISON, fp8_step, make_case  # noqa: E402

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from mla_passes.kernels.triton_prep import _store_out  # noqa: E402

FN, FNUZ = torch.float8_e4m3fn, torch.float8_e4m3fnuz


@triton.jit
def _fnuz_probe(x_ptr, out_ptr, N: tl.constexpr):
    """Stores fp32 values through the kernel's fnuz-bits path (mode 2)."""
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    _store_out(out_ptr + offs, x, offs < N, 1.0, 2, 240.0, True)


def _run_triton(case, cfg=None):
    """The Triton backend on ``case``; ``cfg`` overrides some of the heuristic's blocks."""
    from mla_passes.kernels import triton_prep

    dims = check_fused_decode_prep_args(*case.kernel_args())
    if cfg is None:
        triton_prep.fused_decode_prep_triton(*case.kernel_args(), dims)
    else:
        full = dict(triton_prep.launch_config(dims.T, dims.H, dims.L, case.q.device, dims.P), **cfg)
        triton_prep.launch(*case.kernel_args(), dims, full)


def _with_guarded_q_out(case, margin=3):
    """Put q_out inside a bigger poisoned buffer; return the buffer."""
    T, H, D = case.q_out.shape
    big = torch.full((T + 2, H + 1, D + 2 * margin), POISON, dtype=torch.float32,
                     device=case.q_out.device).to(case.q_out.dtype)
    case.q_out = big[1:T + 1, :H, margin:margin + D]
    return big


def _check_guard(big, margin=3):
    T, H = big.shape[0] - 2, big.shape[1] - 1
    D = big.shape[2] - 2 * margin
    inner = torch.zeros(big.shape, dtype=torch.bool, device=big.device)
    inner[1:T + 1, :H, margin:margin + D] = True
    assert (big.float()[~inner] == POISON).all(), "a write landed outside q_out"


# ------------------------------------------------------------ CPU: interpreter

# name -> make_case kwargs (+ "int32", "guard" flags), small enough for the interpreter
INTERP_CASES = {
    "fp16_auto_neox": dict(T=5, H=4, P=32, L=64, R=16, dtype=torch.float16),
    "fp16_fp8u8_gptj_bs1": dict(T=5, H=4, P=32, L=64, R=16, dtype=torch.float16, kv_cache_dtype="fp8",
                                 q_fp8_dtype=FN, is_neox=False, block_size=1),
    "bf16_fp8fn_kpe3d_int32": dict(T=6, H=3, P=32, L=64, R=16, dtype=torch.bfloat16, kv_cache_dtype="fp8",
                                   cache_fp8_dtype=FN, q_fp8_dtype=FN, k_pe_3d=True, int32=True),
    "fp16_fnuz_bits_gptj": dict(T=5, H=2, P=32, L=64, R=16, dtype=torch.float16, kv_cache_dtype="fp8",
                                cache_fp8_dtype=FNUZ, q_fp8_dtype=FNUZ, is_neox=False),
    "fp16_fp8cache_q_unquant": dict(T=4, H=2, P=16, L=32, R=8, dtype=torch.float16, kv_cache_dtype="fp8"),
    "odd_dims_padded": dict(T=3, H=3, P=24, L=40, R=12, dtype=torch.float16, block_size=1,
                            kv_cache_dtype="fp8", q_fp8_dtype=FN),
    "two_token_blocks": dict(T=70, H=2, P=16, L=32, R=8, dtype=torch.float16, block_size=64,
                             q_fp8_dtype=FN, kv_cache_dtype="fp8", is_neox=False),
    "fp32_model": dict(T=3, H=2, P=16, L=32, R=8, dtype=torch.float32, is_neox=False),
    "all_padding": dict(T=4, H=2, P=16, L=32, R=8, dtype=torch.float16, pad_every=1, q_fp8_dtype=FN),
    "deepseek_dims": dict(T=3, H=2, P=128, L=512, R=64, dtype=torch.float16, kv_cache_dtype="fp8",
                          q_fp8_dtype=FN, block_size=64, k_pe_3d=True),
    "deepseek_dims_gptj": dict(T=3, H=2, P=128, L=512, R=64, dtype=torch.float16, kv_cache_dtype="fp8",
                               q_fp8_dtype=FN, block_size=64, k_pe_3d=True, is_neox=False),
    # GPT-J with a rotary half that is not a power of two: the de-interleaved row is padded
    "gptj_padded_half_side_blocks": dict(T=9, H=5, P=16, L=40, R=12, dtype=torch.float16, is_neox=False,
                                         kv_cache_dtype="fp8", q_fp8_dtype=FN, block_size=4,
                                         cfg=dict(SIDE_T=4, SIDE_H=2)),
    "one_token_gemv": dict(T=1, H=2, P=128, L=512, R=64, dtype=torch.float16, kv_cache_dtype="fp8",
                           q_fp8_dtype=FN, block_size=16),
    "guarded_q_out": dict(T=5, H=3, P=16, L=32, R=8, dtype=torch.float16, q_fp8_dtype=FN,
                          kv_cache_dtype="fp8", guard=True),
    # one head, more kv_c tiles than programs: the cache-copy loop; a ragged last column chunk
    "one_head_tile_loop": dict(T=18, H=1, P=16, L=80, R=8, dtype=torch.float16, kv_cache_dtype="fp8",
                               q_fp8_dtype=FN, cfg=dict(BLOCK_T=16, BLOCK_L=16, LB_ITERS=2, num_warps=4)),
    "looped_columns": dict(T=20, H=3, P=32, L=128, R=16, dtype=torch.float16, is_neox=False,
                           cfg=dict(BLOCK_T=32, BLOCK_L=32, LB_ITERS=4, num_warps=4)),
    # GEMV absorb (2 tokens, 2 column tiles); side programs of 2 tokens x 2 heads: 3 head blocks,
    # kv_c split over them (the last one's columns all past L), k_pe on the last
    "gemv_side_blocks": dict(T=7, H=5, P=32, L=64, R=16, dtype=torch.float16, kv_cache_dtype="fp8",
                             q_fp8_dtype=FN, block_size=4,
                             cfg=dict(BLOCK_T=2, BLOCK_L=16, LB_ITERS=2, GEMV=True, SIDE_T=2, SIDE_H=2)),
    "gemv_odd_dims_one_head_sides": dict(T=5, H=3, P=24, L=40, R=12, dtype=torch.bfloat16, is_neox=False,
                                         cfg=dict(BLOCK_T=4, BLOCK_L=16, LB_ITERS=1, SIDE_T=4, SIDE_H=1)),
}


def _interp_case(name: str) -> None:
    kw = dict(INTERP_CASES[name])
    int32, guard, cfg = kw.pop("int32", False), kw.pop("guard", False), kw.pop("cfg", None)
    case = make_case(seed=len(name), **kw)
    if int32:
        case.positions, case.slot_mapping = case.positions.int(), case.slot_mapping.int()
    big = _with_guarded_q_out(case) if guard else None
    cache_fp8 = kw.get("cache_fp8_dtype") or platform_fp8_dtype("cpu")
    check_case(case, _run_triton if cfg is None else (lambda c: _run_triton(c, cfg)), cache_fp8=cache_fp8)
    if guard:
        _check_guard(big)


def _interp_gather() -> None:
    """gather_cache_rows_triton == the reference, for uint8/fn/fnuz/bf16 caches."""
    from mla_passes.kernels.triton_prep import gather_cache_rows_triton

    g = torch.Generator().manual_seed(0)
    for kvd, flavour in (("fp8", None), ("fp8", FN), ("fp8", FNUZ), ("auto", None)):
        case = make_case(6, 2, P=16, L=32, R=8, dtype=torch.float16, kv_cache_dtype=kvd,
                         cache_fp8_dtype=flavour, block_size=4, seed=1)
        flat = case.kv_cache.view(-1, case.kv_cache.shape[-1])
        if kvd == "fp8":  # every fp8 code somewhere, NaN codes excepted
            codes = torch.randint(0, 256, flat.shape, generator=g, dtype=torch.uint8)
            codes[(codes & 0x7F) == 0x7F] = 0x11
            codes[codes == 0x80] = 0x12
            flat.view(torch.uint8).copy_(codes)
        else:
            flat.copy_(torch.randn(flat.shape, generator=g))
        slots = torch.tensor([3, -1, 0, flat.shape[0] - 1, 7, -5, 12])
        got = gather_cache_rows_triton(case.kv_cache, slots, kvd, case.k_scale, torch.float32)
        ref = gather_cache_rows_reference(case.kv_cache, slots, kvd, case.k_scale, torch.float32)
        assert got.shape == ref.shape and torch.equal(got, ref), (kvd, flavour, (got - ref).abs().max())


def _interp_fnuz_bits() -> None:
    """The e4m3fnuz-through-e4m3fn store is bit-exact with torch for every code's
    neighbourhood: all 256 codes, midpoints between them, and random values."""
    k = _fnuz_probe
    vals = torch.arange(256, dtype=torch.uint8).view(FNUZ).float()
    vals = vals[~vals.isnan()].sort().values
    mids = (vals[1:] + vals[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    rnd = torch.cat([torch.randn(2000, generator=g) * s for s in (1e-3, 0.1, 10, 100)])
    x = torch.cat([vals, mids, rnd, torch.tensor([-0.0, 500.0, -500.0, 232.0, -232.0, 236.0])])
    x = x.clamp(-240, 240)
    N = triton.next_power_of_2(x.numel())
    xx = torch.zeros(N)
    xx[: x.numel()] = x
    out = torch.zeros(N, dtype=torch.uint8)
    k[(1,)](xx, out, N=N)
    ref = xx.to(FNUZ).view(torch.uint8)
    bad = (out != ref).nonzero().flatten()
    assert bad.numel() == 0, [(xx[i].item(), out[i].item(), ref[i].item()) for i in bad[:5]]


def _strided(idx: torch.Tensor) -> torch.Tensor:
    """The same values as a view with stride 2 (junk in between)."""
    return torch.stack((idx, torch.full_like(idx, 10**6)), dim=1)[:, 0]


def _interp_strided_indices(device: str = "cpu") -> None:
    """Strided positions / slot_mapping views are read through their strides,
    both conventions (they were read as contiguous: wrong q_out and cache rows)."""
    for is_neox in (True, False):
        for int32 in (False, True):
            case = make_case(7, 3, P=16, L=32, R=8, dtype=torch.float16, kv_cache_dtype="fp8", q_fp8_dtype=FN,
                             block_size=4, is_neox=is_neox, seed=11 + int32, device=device)
            if int32:
                case.positions, case.slot_mapping = case.positions.int(), case.slot_mapping.int()
            case.positions, case.slot_mapping = _strided(case.positions), _strided(case.slot_mapping)
            assert case.positions.stride(0) == 2 and case.slot_mapping.stride(0) == 2
            check_case(case, _run_triton)
    from mla_passes.kernels.triton_prep import gather_cache_rows_triton

    case = make_case(6, 2, P=16, L=32, R=8, dtype=torch.float16, block_size=4, seed=2, device=device)
    _run_triton(case)
    slots = _strided(case.slot_mapping)
    got = gather_cache_rows_triton(case.kv_cache, slots, "auto", case.k_scale, torch.float32)
    assert torch.equal(got, gather_cache_rows_reference(case.kv_cache, slots, "auto", case.k_scale, torch.float32))


def _interp_out_of_range(device: str = "cpu") -> None:
    """Slots past the cache write nothing (they wrote past its end); positions
    outside cos_sin_cache read nothing and give NaN rotary values (they read
    past the table: garbage, or a fault on the GPU). Other tokens are right."""
    from mla_passes.kernels.reference import fused_decode_prep_reference

    for is_neox in (True, False):
        case = make_case(6, 3, P=16, L=32, R=8, dtype=torch.float16, kv_cache_dtype="fp8", q_fp8_dtype=FN,
                         block_size=4, is_neox=is_neox, pad_every=0, max_pos=64, seed=5, device=device)
        nb, bs, D = case.kv_cache.shape
        # the cache is the front of a bigger poisoned buffer: a write past its end lands in the guard
        big = torch.cat((case.kv_cache, case.kv_cache[:3].clone()), dim=0)
        case.kv_cache = big[:nb]
        guard = big[nb:].clone()
        n_slots, max_pos = nb * bs, case.cos_sin_cache.shape[0]
        bad_slot, bad_pos = [1, 4], [2, 4]  # token 4: both
        case.slot_mapping[1], case.slot_mapping[4] = n_slots + 1, n_slots + 6
        case.positions[2], case.positions[4] = max_pos + 5, -3
        ok_pos = case.clone()
        ok_pos.positions[bad_pos] = 0
        ok_pos.slot_mapping[bad_slot] = -1
        ref = ok_pos.clone()
        dims = check_fused_decode_prep_args(*ref.kernel_args())
        fused_decode_prep_reference(*ref.kernel_args(), dims)
        before = case.clone()
        _run_triton(case)

        assert torch.equal(big[nb:], guard), "a slot past the cache wrote past its end"
        P, L = 16, 32
        good = torch.tensor([t not in bad_pos for t in range(6)], device=device)
        got_q, ref_q = case.q_out.float(), ref.q_out.float()
        step = fp8_step(ref_q.double(), FN).float()
        assert ((got_q[good] - ref_q[good]).abs() <= step[good]).all()
        assert ((got_q[~good][..., :L] - ref_q[~good][..., :L]).abs() <= step[~good][..., :L]).all()
        assert got_q[~good][..., L:].isnan().all(), "a bad position must give NaN rotary values"
        assert case.q[~good][..., P:].isnan().all() and case.k_pe[~good].isnan().all()
        torch.testing.assert_close(case.q[good].float(), ref.q[good].float(), rtol=3e-3, atol=3e-3)
        # cache: rows of the in-range slots as the reference; token 2 (bad position) has NaN rope
        flat, rflat = case.kv_cache.reshape(-1, D).view(FN), ref.kv_cache.reshape(-1, D).view(FN)
        s2 = int(case.slot_mapping[2])
        assert flat[s2, L:].float().isnan().all() and not flat[s2, :L].float().isnan().any()
        written = [int(case.slot_mapping[t]) for t in range(6) if t not in bad_slot and t not in bad_pos]
        d = (flat[written].float() - rflat[written].float()).abs()
        assert (d <= fp8_step(rflat[written].double(), FN).float()).all()
        untouched = torch.ones(n_slots, dtype=torch.bool, device=device)
        untouched[written + [s2]] = False
        assert torch.equal(case.kv_cache.reshape(-1, D)[untouched], before.kv_cache.reshape(-1, D)[untouched])


def _interp_nan(device: str = "cpu") -> None:
    """NaN in q_nope, q_pe or kv_c comes out as NaN where the reference has NaN
    (the fp8 clamp turned it into +-448), for fn / fnuz-bits / unquantized
    outputs, both conventions."""
    from mla_passes.kernels.reference import fused_decode_prep_reference

    for is_neox in (True, False):
        for flavour, kvd, q8 in ((None, "fp8", FN), (FNUZ, "fp8", FNUZ), (None, "auto", None)):
            case = make_case(5, 3, P=16, L=32, R=8, dtype=torch.float16, kv_cache_dtype=kvd,
                             cache_fp8_dtype=flavour, q_fp8_dtype=q8, block_size=4, is_neox=is_neox,
                             pad_every=0, seed=3, device=device)
            case.q[0, 1, 3] = float("nan")        # q_nope: the whole absorbed row
            case.q[1, 2, 16 + 1] = float("nan")   # q_pe: its rotary pair
            case.kv_c[2, 5] = float("nan")        # kv_c: one cache column
            case.k_pe[3, 6] = float("nan")        # k_pe: its pair in the cache and in place
            ref = case.clone()
            dims = check_fused_decode_prep_args(*ref.kernel_args())
            fused_decode_prep_reference(*ref.kernel_args(), dims)
            _run_triton(case)
            assert ref.q_out.float().isnan().any()
            assert torch.equal(case.q_out.float().isnan(), ref.q_out.float().isnan()), (is_neox, flavour, kvd)
            fl = flavour or (FN if kvd == "fp8" else None)
            got_c = case.kv_cache.view(fl) if fl else case.kv_cache
            ref_c = ref.kv_cache.view(fl) if fl else ref.kv_cache
            assert torch.equal(got_c.float().isnan(), ref_c.float().isnan()), (is_neox, flavour, kvd)
            assert torch.equal(case.q.isnan(), ref.q.isnan()) and torch.equal(case.k_pe.isnan(), ref.k_pe.isnan())


def _interp_run_all() -> dict:
    """Run every interpreter check in this process; name -> 'ok' or the error."""
    out = {}
    checks = {f"case:{n}": (lambda n=n: _interp_case(n)) for n in INTERP_CASES}
    checks["gather"] = _interp_gather
    checks["fnuz_bits"] = _interp_fnuz_bits
    checks["strided_indices"] = _interp_strided_indices
    checks["out_of_range"] = _interp_out_of_range
    checks["nan"] = _interp_nan
    for name, fn in checks.items():
        try:
            fn()
            out[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the parent test
            out[name] = traceback.format_exc(limit=4)
    return out


@pytest.fixture(scope="module")
def interp_results():
    code = (
        "import os, sys, json\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "import test_triton_kernel as m\n"
        "print('@@RESULTS@@' + json.dumps(m._interp_run_all()))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    marker = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULTS@@")]
    assert marker, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(marker[-1][len("@@RESULTS@@"):])


@pytest.mark.parametrize("name", [f"case:{n}" for n in INTERP_CASES]
                         + ["gather", "fnuz_bits", "strided_indices", "out_of_range", "nan"])
def test_interpreter(interp_results, name):
    """The Triton kernels under the CPU interpreter match the float64 oracle / torch."""
    assert interp_results[name] == "ok", interp_results[name]


# ------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA/ROCm device")

H_GRID, T_GRID, BS_GRID = (16, 32, 64, 128), (1, 3, 16, 64, 256, 512), (1, 16, 64)
# Every (H, T, block size) twice, with complementary settings of the binary
# factors (model dtype, cache, rope style, q quant), so each factor value
# meets every shape.
GPU_GRID = []
for i, (H, T, bs) in enumerate(itertools.product(H_GRID, T_GRID, BS_GRID)):
    for bits in (i % 16, 15 - i % 16):
        GPU_GRID.append(dict(
            H=H, T=T, block_size=bs,
            dtype=torch.bfloat16 if bits & 1 else torch.float16,
            kv_cache_dtype="fp8" if bits & 2 else "auto",
            is_neox=bool(bits & 4),
            q_fp8=bool(bits & 8),
        ))


def _gpu_id(p):
    return (f"H{p['H']}-T{p['T']}-bs{p['block_size']}-{str(p['dtype'])[6:]}-{p['kv_cache_dtype']}"
            f"-{'neox' if p['is_neox'] else 'gptj'}-{'qfp8' if p['q_fp8'] else 'q16'}")


@gpu
@needs_cuda
@pytest.mark.parametrize("p", GPU_GRID, ids=_gpu_id)
def test_gpu_parity(p):
    """The kernel matches the float64 oracle (fp8 within one step, bf16 1e-2)."""
    fp8 = platform_fp8_dtype("cuda")
    case = make_case(p["T"], p["H"], block_size=p["block_size"], dtype=p["dtype"],
                     kv_cache_dtype=p["kv_cache_dtype"], q_fp8_dtype=fp8 if p["q_fp8"] else None,
                     is_neox=p["is_neox"], k_pe_3d=p["T"] % 2 == 1, device="cuda",
                     seed=p["T"] * 131 + p["H"] + p["block_size"])
    big = _with_guarded_q_out(case)
    check_case(case, _run_triton)
    _check_guard(big)


@gpu
@needs_cuda
@pytest.mark.parametrize("flavour", FP8_DTYPES)
def test_gpu_fp8_dtype_caches(flavour):
    """Caches and q_out of an fp8 dtype (either flavour), not uint8 bits."""
    case = make_case(33, 16, block_size=16, kv_cache_dtype="fp8", cache_fp8_dtype=flavour,
                     q_fp8_dtype=flavour, device="cuda", seed=5)
    check_case(case, _run_triton, cache_fp8=flavour)


@gpu
@needs_cuda
def test_gpu_dispatcher_picks_triton():
    """backend='auto' resolves to triton on an NVIDIA GPU and runs it."""
    from mla_passes.kernels import fused_decode_prep, resolve_backend

    if torch.version.hip is None:
        assert resolve_backend("auto", "cuda") == "triton"
    case = make_case(8, 16, kv_cache_dtype="fp8", q_fp8_dtype=platform_fp8_dtype("cuda"), device="cuda", seed=7)
    check_case(case, lambda c: fused_decode_prep(*c.kernel_args(), backend="triton"))


@gpu
@needs_cuda
@pytest.mark.parametrize("T,H,kvd,q_fp8", [(64, 16, "fp8", True), (5, 128, "auto", False), (256, 32, "fp8", False)])
def test_gpu_cuda_graph_replay(T, H, kvd, q_fp8):
    """Captured once; every replay with new positions/slots/inputs copied into
    the static buffers is right, and a replay allocates nothing."""
    fp8 = platform_fp8_dtype("cuda")
    static = make_case(T, H, block_size=16, num_blocks=4 * T // 16 + 8, kv_cache_dtype=kvd,
                       q_fp8_dtype=fp8 if q_fp8 else None, device="cuda", seed=1)
    big = _with_guarded_q_out(static)
    for _ in range(2):  # compile + warm up outside the capture
        _run_triton(static)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        _run_triton(static)
    torch.cuda.synchronize()

    stats = []

    def replay(_case):
        torch.cuda.synchronize()
        before = (torch.cuda.memory_allocated(), torch.cuda.memory_stats()["allocation.all.allocated"])
        g.replay()
        torch.cuda.synchronize()
        after = (torch.cuda.memory_allocated(), torch.cuda.memory_stats()["allocation.all.allocated"])
        stats.append((before, after))

    for r in range(3):
        fresh = make_case(T, H, block_size=16, num_blocks=static.kv_cache.shape[0], kv_cache_dtype=kvd,
                          q_fp8_dtype=fp8 if q_fp8 else None, device="cuda", seed=100 + r)
        for name in ("q", "kv_c", "k_pe", "positions", "slot_mapping", "k_scale"):
            getattr(static, name).copy_(getattr(fresh, name))
        if q_fp8:
            static.q_scale.copy_(fresh.q_scale)
        static.q_out.copy_(torch.full(static.q_out.shape, POISON, device="cuda"))
        check_case(static, replay)
        _check_guard(big)
    assert all(b == a for b, a in stats), stats


@gpu
@needs_cuda
@pytest.mark.parametrize("kvd,flavour", [("fp8", None), ("fp8", FN), ("auto", None)])
def test_gpu_gather_cache_rows(kvd, flavour):
    """gather_cache_rows on CUDA (the Triton kernel) equals the reference."""
    from mla_passes.kernels import fused_decode_prep, gather_cache_rows

    case = make_case(40, 16, block_size=16, kv_cache_dtype=kvd, cache_fp8_dtype=flavour, device="cuda", seed=3)
    fused_decode_prep(*case.kernel_args(), backend="triton")
    slots = torch.cat([case.slot_mapping, torch.tensor([-1, 0], device="cuda")])
    got = gather_cache_rows(case.kv_cache, slots, kvd, case.k_scale, dtype=torch.float32)
    ref = gather_cache_rows_reference(case.kv_cache, slots, kvd, case.k_scale, torch.float32)
    assert torch.equal(got, ref)


@gpu
@needs_cuda
@pytest.mark.parametrize("check", ["strided_indices", "out_of_range", "nan"])
def test_gpu_index_and_nan_contract(check):
    """On the GPU as under the interpreter: strided indices honoured, out-of-range
    rows masked (no fault, no stray write), NaN propagated into fp8 outputs."""
    globals()[f"_interp_{check}"](device="cuda")


# --- programmatic dependent launch (Hopper+) ---------------------------------------------------

needs_pdl = pytest.mark.skipif(not torch.cuda.is_available() or torch.version.hip is not None
                               or torch.cuda.get_device_capability()[0] < 9,
                               reason="programmatic dependent launch needs an NVIDIA GPU of compute capability >= 9")


def test_pdl_off_unless_asked_and_never_on_cpu(monkeypatch):
    """PDL is opt-in (MLA_PASSES_PDL=1) and never chosen for a CPU tensor or under the interpreter."""
    from mla_passes.kernels import triton_prep

    monkeypatch.delenv("MLA_PASSES_PDL", raising=False)
    assert triton_prep.launch_config(8, 16, 512, torch.device("cpu"))["PDL"] is False
    monkeypatch.setenv("MLA_PASSES_PDL", "1")
    assert triton_prep.pdl_enabled(torch.device("cpu")) is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_prep.pdl_enabled(torch.device("cuda")) is False


@gpu
@needs_pdl
@pytest.mark.parametrize("H,T,is_neox,q_fp8,kvd", [
    (8, 1, False, True, "fp8"), (8, 64, False, True, "fp8"), (16, 1, True, False, "auto"),
    (16, 256, False, True, "fp8"), (128, 5, False, False, "auto"), (128, 256, True, True, "fp8")])
def test_gpu_pdl_parity(H, T, is_neox, q_fp8, kvd):
    """The PDL launch (W/positions/cos-sin loads before gdc_wait) computes what the plain one does."""
    fp8 = platform_fp8_dtype("cuda")
    case = make_case(T, H, block_size=16, kv_cache_dtype=kvd, q_fp8_dtype=fp8 if q_fp8 else None,
                     is_neox=is_neox, device="cuda", seed=17 * T + H)
    big = _with_guarded_q_out(case)
    check_case(case, lambda c: _run_triton(c, dict(PDL=True)))
    _check_guard(big)


@gpu
@needs_pdl
@pytest.mark.parametrize("T,H", [(1, 8), (64, 16), (256, 128)])
def test_gpu_pdl_cuda_graph_replay_after_producer(T, H):
    """Under CUDA-graph replay, a PDL launch right after the kernels that write its q, kv_c and
    k_pe (copies inside the graph) reads their new values: every replay, fresh inputs, poisoned
    q_out, is right."""
    fp8 = platform_fp8_dtype("cuda")
    static = make_case(T, H, block_size=16, num_blocks=4 * T // 16 + 8, kv_cache_dtype="fp8",
                       q_fp8_dtype=fp8, device="cuda", seed=3)
    src = {n: getattr(static, n).clone() for n in ("q", "kv_c", "k_pe")}
    big = _with_guarded_q_out(static)

    def step():
        for n, t in src.items():  # the producers: the PDL kernel may start before they end
            getattr(static, n).copy_(t)
        _run_triton(static, dict(PDL=True))

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    torch.cuda.synchronize()
    for r in range(3):
        fresh = make_case(T, H, block_size=16, num_blocks=static.kv_cache.shape[0], kv_cache_dtype="fp8",
                          q_fp8_dtype=fp8, device="cuda", seed=200 + r)
        for n in src:
            src[n].copy_(getattr(fresh, n))
            getattr(static, n).fill_(float("nan"))  # stale values the kernel must not read
        for n in ("positions", "slot_mapping", "k_scale", "q_scale"):
            getattr(static, n).copy_(getattr(fresh, n))
        static.kv_cache.copy_(fresh.kv_cache)
        static.q_out.copy_(torch.full(static.q_out.shape, POISON, device="cuda"))
        expect = static.clone()
        for n in src:  # what the graph's copies will put there
            getattr(expect, n).copy_(src[n])
        from mla_passes.kernels import fused_decode_prep

        fused_decode_prep(*expect.kernel_args(), backend="reference")
        g.replay()
        torch.cuda.synchronize()
        got_q, exp_q = static.q_out.float(), expect.q_out.float()
        assert torch.isfinite(got_q).all(), f"replay {r}: q_out read a stale (NaN) input or was left unwritten"
        assert ((got_q - exp_q).abs() <= fp8_step(torch.maximum(got_q.abs(), exp_q.abs()), fp8) * 1.01).all()
        torch.testing.assert_close(static.q.float(), expect.q.float(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(static.k_pe.float(), expect.k_pe.float(), rtol=1e-2, atol=1e-2)
        got_c, exp_c = static.kv_cache.view(fp8).float(), expect.kv_cache.view(fp8).float()
        assert torch.isfinite(got_c).all(), f"replay {r}: a cache row was written from a stale input"
        assert ((got_c - exp_c).abs() <= fp8_step(torch.maximum(got_c.abs(), exp_c.abs()), fp8) * 1.01).all()
        _check_guard(big)
