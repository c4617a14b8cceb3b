"""``mla-passes bench``: time the fused decode prep against what it replaces.

On a GPU, DeepSeek-V3 dims (P=128, R=64, L=512), fp8 cache and fp8 q, every
variant captured in a CUDA graph and timed by replay:

* ``fused``   - the one Triton kernel of this library (``backend="triton"``);
* ``compile`` - the unfused chain through ``torch.compile``: RoPE in torch, the
  cache write as a mutating custom op (so Inductor does not copy the cache;
  one small Triton kernel, the stand-in for vLLM's ``concat_and_cache_mla``),
  the absorb bmm, cat and quant;
* ``aiter``   - AITER's own Triton kernel ``fused_qk_rope_cat_and_cache_mla``
  (loaded through :mod:`tools.aiter_stub`) + torch bmm + a compiled quant;
* the floor: the bytes that must move over the measured copy bandwidth, and
  one tiny kernel in a graph.

Each graph runs ``--layers`` independent layers (own weights, inputs, caches),
so a layer's weights are not served from L2 by the previous replay; times are
per layer. ``--check-only`` runs every variant once against the reference
instead (on CPU too, with ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

HELP = "time the fused MLA decode prep vs the torch.compile chain, AITER's Triton path and the floor"

P, L, R = 128, 512, 64
DEFAULT_HEADS = (16, 128)
DEFAULT_TOKENS = (1, 8, 32, 64, 128, 256)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heads", type=int, nargs="+", default=list(DEFAULT_HEADS))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS))
    parser.add_argument("--variants", default="fused,compile,aiter",
                        help="comma-separated subset of fused,compile,aiter (diagnosis: fused_absorb, "
                             "fused_cache, fused_rope, fused_empty = the kernel with only that part on)")
    parser.add_argument("--layers", type=int, default=8, help="independent layers per graph (default 8)")
    parser.add_argument("--reps", type=int, default=25, help="timed batches per variant; the median is reported")
    parser.add_argument("--inner", type=int, default=10, help="graph replays per timed batch")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--gptj", action="store_true", help="GPT-J rotary pairs (default NeoX)")
    parser.add_argument("--sweep", action="store_true", help="also time other launch configs of the fused kernel")
    parser.add_argument("--check-only", action="store_true",
                        help="check every variant against the reference once; no timing")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", metavar="PATH", help="write all numbers as JSON")


# ------------------------------------------------------------------ variants


def _bench_ops():
    """The custom op of the unfused chain's cache write (registered once)."""
    if hasattr(_bench_ops, "op"):
        return _bench_ops.op
    from mla_passes.kernels.triton_prep import concat_and_cache_mla_triton

    @torch.library.custom_op("mla_passes_bench::concat_and_cache_mla", mutates_args=("kv_cache",))
    def concat_and_cache_mla(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                             slot_mapping: torch.Tensor, k_scale: torch.Tensor) -> None:
        concat_and_cache_mla_triton(kv_c, k_pe, kv_cache, slot_mapping, "fp8", k_scale)

    @concat_and_cache_mla.register_fake
    def _(kv_c, k_pe, kv_cache, slot_mapping, k_scale) -> None:
        return None

    _bench_ops.op = torch.ops.mla_passes_bench.concat_and_cache_mla
    return _bench_ops.op


def _make_chain(is_neox: bool):
    """The unfused decode prep as torch ops, for torch.compile."""
    from mla_passes.kernels.fp8 import fp8_max
    from mla_passes.kernels.reference import rope_fp32

    cache_write = _bench_ops()

    def chain(q, kv_c, k_pe, w_uk_t, positions, cos_sin_cache, slot_mapping, kv_cache, k_scale, q_scale, q_out):
        cos, sin = cos_sin_cache.index_select(0, positions).float().chunk(2, dim=-1)
        q_pe = q[..., P:]
        q_pe.copy_(rope_fp32(q_pe, cos[:, None, :], sin[:, None, :], is_neox).to(q.dtype))
        k_pe.copy_(rope_fp32(k_pe, cos, sin, is_neox).to(k_pe.dtype))
        cache_write(kv_c, k_pe, kv_cache, slot_mapping, k_scale)
        ql = torch.bmm(q[..., :P].transpose(0, 1), w_uk_t).transpose(0, 1)
        m = fp8_max(q_out.dtype)
        q_out.copy_((torch.cat((ql, q_pe), dim=-1).float() / q_scale).clamp(-m, m).to(q_out.dtype))

    return chain


def _quant_into(x, q_scale, q_out):
    from mla_passes.kernels.fp8 import fp8_max

    m = fp8_max(q_out.dtype)
    q_out.copy_((x.float() / q_scale).clamp(-m, m).to(q_out.dtype))


class Layer:
    """One layer's buffers: a decode-prep case plus what the AITER path needs."""

    def __init__(self, T, H, args, seed, device):
        from mla_passes.kernels.fp8 import platform_fp8_dtype
        from mla_passes.kernels.validate import check_fused_decode_prep_args
        from mla_passes.testing import make_case

        dtype = getattr(torch, args.dtype)
        fp8 = platform_fp8_dtype(device)
        self.case = make_case(T, H, P=P, L=L, R=R, block_size=args.block_size, dtype=dtype,
                              kv_cache_dtype="fp8", q_fp8_dtype=fp8, is_neox=not args.gptj,
                              num_blocks=max(4, 4 * T // args.block_size + 2), device=device, seed=seed)
        self.dims = check_fused_decode_prep_args(*self.case.kernel_args())
        c = self.case
        self.slot64, self.pos64 = c.slot_mapping.long(), c.positions.long()
        half = R // 2
        self.cos = c.cos_sin_cache[:, :half].contiguous()
        self.sin = c.cos_sin_cache[:, half:].contiguous()
        self.cache_b1 = c.kv_cache.view(fp8).view(-1, 1, L + R)
        self.q_tmp = torch.empty(c.q_out.shape, dtype=dtype, device=device)


def _variants(names, is_neox, device):
    from mla_passes.kernels.triton_prep import fused_decode_prep_triton

    out = {}
    if "fused" in names:
        out["fused"] = lambda ly: fused_decode_prep_triton(*ly.case.kernel_args(), ly.dims)
    for parts, label in ((1, "absorb"), (2, "cache"), (4, "rope"), (0, "empty")):
        if f"fused_{label}" in names:  # diagnosis: the kernel with only some parts switched on
            out[f"fused_{label}"] = (lambda ly, parts=parts:
                                     fused_decode_prep_triton(*ly.case.kernel_args(), ly.dims, _parts=parts))
    if "compile" in names:
        compiled = torch.compile(_make_chain(is_neox), fullgraph=True, dynamic=False)
        out["compile"] = lambda ly: compiled(
            ly.case.q, ly.case.kv_c, ly.case.k_pe, ly.case.w_uk_t, ly.case.positions, ly.case.cos_sin_cache,
            ly.case.slot_mapping, ly.case.kv_cache, ly.case.k_scale, ly.case.q_scale, ly.case.q_out)
    if "aiter" in names:
        try:
            from tools.aiter_stub import load_fused_qk_rope_cat_and_cache_mla
        except ImportError:
            from mla_passes.tools.aiter_stub import load_fused_qk_rope_cat_and_cache_mla
        try:
            aiter_fn = load_fused_qk_rope_cat_and_cache_mla()
        except Exception as e:  # noqa: BLE001 - reported, the rest still runs
            print(f"[bench] AITER Triton path unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        else:
            quant = torch.compile(_quant_into, fullgraph=True, dynamic=False)

            def aiter_path(ly):
                c = ly.case
                ql = torch.bmm(c.q[..., :P].transpose(0, 1), c.w_uk_t).transpose(0, 1)
                aiter_fn(ql, c.q[..., P:], c.kv_c.unsqueeze(1), c.k_pe.unsqueeze(1), ly.cache_b1, ly.slot64,
                         ly.pos64, ly.cos, ly.sin, c.k_scale, c.is_neox, q_out=ly.q_tmp)
                quant(ly.q_tmp, c.q_scale, c.q_out)

            out["aiter"] = aiter_path
    return out


# ------------------------------------------------------------------- checks


def _check_variant(name, fn, T, H, args, device) -> dict:
    """Run ``fn`` once on a fresh layer and compare with the reference backend."""
    from mla_passes.kernels.fp8 import platform_fp8_dtype
    from mla_passes.kernels.reference import fused_decode_prep_reference
    from mla_passes.testing import fp8_step

    ly = Layer(T, H, args, seed=T + H, device=device)
    ref = ly.case.clone()
    fused_decode_prep_reference(*ref.kernel_args(), ly.dims)
    fn(ly)
    fp8 = platform_fp8_dtype(device)
    r = ref.q_out.double()
    q_steps = ((ly.case.q_out.double() - r).abs() / fp8_step(r, fp8)).max().item()
    valid = ref.slot_mapping >= 0
    rc = ref.kv_cache.view(fp8).view(-1, L + R).double()
    gc = ly.case.kv_cache.view(fp8).view(-1, L + R).double()
    c_steps = ((gc - rc).abs() / fp8_step(rc, fp8)).max().item()
    untouched = torch.ones(rc.shape[0], dtype=torch.bool, device=rc.device)
    untouched[ref.slot_mapping[valid].long()] = False
    cache_guard = torch.equal(gc[untouched].nan_to_num(), rc[untouched].nan_to_num())
    # AITER's Triton kernel leaves q_pe unrotated (it writes rotated copies): not compared
    qpe_err = (ly.case.q[..., P:].double() - ref.q[..., P:].double()).abs().max().item()
    return dict(variant=name, T=T, H=H, dtype=args.dtype, q_out_max_fp8_steps=q_steps,
                cache_max_fp8_steps=c_steps, other_cache_rows_untouched=cache_guard,
                q_pe_inplace_max_abs_err=None if name == "aiter" else qpe_err)


# ------------------------------------------------------------------- timing


def _time_graph(fn, layers, reps, inner) -> float:
    """Median microseconds per layer of a CUDA graph running ``fn`` on every layer."""
    for _ in range(2):
        for ly in layers:
            fn(ly)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for ly in layers:
            fn(ly)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for ly in layers:
            fn(ly)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (inner * len(layers)))
    del g
    return statistics.median(times)


def _copy_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del x, y
    return 2 * n / statistics.median(times)


def _tiny_kernel_us(device, n_layers, reps, inner) -> float:
    x = torch.zeros(1, device=device)
    return _time_graph(lambda ly: x.add_(1.0), list(range(n_layers)), reps, inner)


def min_bytes(T: int, H: int, model_bytes: int = 2) -> int:
    """Bytes a decode prep must move: each input read once, each output written once."""
    reads = (T * H * (P + R) * model_bytes      # q (nope + pe)
             + H * P * L * model_bytes          # W_UK_T
             + T * (L + R) * model_bytes        # kv_c + k_pe
             + T * R * 4 + 2 * T * 8 + 8)       # cos/sin rows, positions, slots, scales
    writes = (T * H * (L + R) * 1               # q_out (fp8)
              + T * (L + R) * 1                 # cache rows (fp8)
              + T * H * R * model_bytes         # q_pe rotated in place
              + T * R * model_bytes)            # k_pe rotated in place
    return reads + writes


SWEEP = ([dict(BLOCK_T=1, BLOCK_L=bl, LB_ITERS=1, GEMV=True, num_warps=4, num_stages=2) for bl in (32, 64, 128)]
         + [dict(BLOCK_T=bt, BLOCK_L=bl, LB_ITERS=it, GEMV=False, num_warps=nw, num_stages=3 if it > 1 else 2)
            for bt in (16, 32, 64, 128) for bl, it in ((32, 1), (64, 1), (128, 1), (64, 2))
            for nw in ((4,) if bt < 64 else (4, 8))])
# (the side programs keep the heuristic's SIDE_T/SIDE_H; tools/kernel_sweep.py sweeps those too)


def _geomean(xs):
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def run(args) -> int:
    device = torch.device(args.device)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if device.type == "cuda" and not torch.cuda.is_available():
        print("mla-passes bench: no CUDA device; use --check-only --device cpu with TRITON_INTERPRET=1",
              file=sys.stderr)
        return 2
    try:
        torch._dynamo.config.cache_size_limit = 256
        torch._dynamo.config.recompile_limit = 256
    except AttributeError:
        pass
    variants = _variants(names, not args.gptj, device)

    if args.check_only:
        rows = []
        for H in args.heads:
            for T in args.tokens:
                for name, fn in variants.items():
                    r = _check_variant(name, fn, T, H, args, device)
                    rows.append(r)
                    print(json.dumps(r))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(check=rows), f, indent=1)
        bad = [r for r in rows if r["q_out_max_fp8_steps"] > 1.0 or r["cache_max_fp8_steps"] > 1.0
               or not r["other_cache_rows_untouched"]]
        return 1 if bad else 0

    import triton

    from mla_passes.kernels import triton_prep

    props = torch.cuda.get_device_properties(device)
    bw = _copy_bandwidth(device)
    tiny = _tiny_kernel_us(device, args.layers, args.reps, args.inner)
    meta = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__, copy_bandwidth_TBps=bw / 1e12, tiny_kernel_in_graph_us=tiny,
                layers_per_graph=args.layers, dtype=args.dtype, block_size=args.block_size,
                is_neox=not args.gptj, dims=dict(P=P, L=L, R=R))
    print(f"device: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"triton {triton.__version__}")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read+write); one tiny kernel in a graph {tiny:.2f} us")

    rows, sweeps = [], []
    for H in args.heads:
        for T in args.tokens:
            t0 = time.time()
            layers = [Layer(T, H, args, seed=1000 * i + T + H, device=device) for i in range(args.layers)]
            row = dict(H=H, T=T, bytes=min_bytes(T, H))
            row["floor_us"] = row["bytes"] / bw * 1e6
            row["bound_us"] = max(row["floor_us"], tiny)
            for name, fn in variants.items():
                try:
                    row[f"{name}_us"] = _time_graph(fn, layers, args.reps, args.inner)
                except Exception as e:  # noqa: BLE001 - one failing variant must not hide the others
                    row[f"{name}_us"] = None
                    row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
                    print(f"[bench] {name} H={H} T={T} failed: {row[f'{name}_error']}", file=sys.stderr)
            row["config"] = triton_prep.launch_config(T, H, L, device)
            if "fused" in variants:  # the compiler's resource report for the heuristic config
                k = variants["fused"](layers[0])
                if k is not None:
                    row["kernel"] = dict(n_regs=getattr(k, "n_regs", None), n_spills=getattr(k, "n_spills", None),
                                         shared=getattr(getattr(k, "metadata", None), "shared", None))
            if args.sweep and "fused" in variants:
                best = None
                for cfg in SWEEP:
                    if cfg["BLOCK_T"] > max(16, triton.next_power_of_2(T)) or (cfg["GEMV"] and T > 1):
                        continue
                    triton_prep._CONFIG_OVERRIDE = cfg
                    try:
                        us = _time_graph(variants["fused"], layers, max(5, args.reps // 3), args.inner)
                    except Exception as e:  # noqa: BLE001
                        us = None
                        print(f"[bench] sweep {cfg} failed: {type(e).__name__}: {e}"[:300], file=sys.stderr)
                    finally:
                        triton_prep._CONFIG_OVERRIDE = None
                    sweeps.append(dict(H=H, T=T, us=us, **cfg))
                    if us is not None and (best is None or us < best[0]):
                        best = (us, cfg)
                if best:
                    row["sweep_best_us"], row["sweep_best_config"] = best
            rows.append(row)
            print("[row] " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
                  flush=True)
            del layers
            torch.cuda.empty_cache()
            print(f"[bench] H={H} T={T} done in {time.time() - t0:.1f}s", file=sys.stderr, flush=True)

    def fmt(x, spec="8.2f"):
        return format(x, spec) if isinstance(x, (int, float)) and x is not None else f"{'-':>8}"

    print()
    hdr = (f"{'H':>4} {'T':>4} {'fused':>8} {'compile':>8} {'aiter':>8} {'floor':>8} {'bound':>8} "
           f"{'vs_comp':>8} {'x_bound':>8} {'vs_aiter':>8}   (us per layer; bound = max(floor, tiny kernel))")
    print(hdr)
    for r in rows:
        f, c, a = r.get("fused_us"), r.get("compile_us"), r.get("aiter_us")
        r["speedup_vs_compile"] = c / f if f and c else None
        r["fused_over_bound"] = f / r["bound_us"] if f else None
        r["speedup_vs_aiter"] = a / f if f and a else None
        print(f"{r['H']:>4} {r['T']:>4} {fmt(f)} {fmt(c)} {fmt(a)} {fmt(r['floor_us'])} {fmt(r['bound_us'])} "
              f"{fmt(r['speedup_vs_compile'])} {fmt(r['fused_over_bound'])} {fmt(r['speedup_vs_aiter'])}")
    gm = _geomean([r["speedup_vs_compile"] for r in rows])
    worst_bound = max((r["fused_over_bound"] for r in rows if r["fused_over_bound"]), default=float("nan"))
    aiter_rows = [r for r in rows if r["speedup_vs_aiter"]]
    summary = dict(
        geomean_speedup_vs_compile=gm,
        target_geomean_3x=gm >= 3.0,
        worst_fused_over_bound=worst_bound,
        target_within_2x_of_bound=worst_bound <= 2.0,
        faster_than_aiter_everywhere=bool(aiter_rows) and all(r["speedup_vs_aiter"] > 1.0 for r in aiter_rows),
        aiter_rows=len(aiter_rows),
    )
    print(f"\ngeomean speedup vs torch.compile chain: {gm:.2f}x (target >= 3x: {'met' if gm >= 3 else 'MISSED'})")
    print(f"worst fused / max(floor, tiny kernel): {worst_bound:.2f}x (target <= 2x: "
          f"{'met' if worst_bound <= 2 else 'MISSED'})")
    print(f"faster than AITER's Triton path on {sum(r['speedup_vs_aiter'] > 1 for r in aiter_rows)}"
          f"/{len(aiter_rows)} shapes")
    if args.sweep:
        print("\nsweep: best fused config per shape")
        for r in rows:
            if "sweep_best_config" in r:
                print(f"  H={r['H']:>3} T={r['T']:>3} heuristic {fmt(r.get('fused_us'))} us {r['config']}  "
                      f"best {fmt(r['sweep_best_us'])} us {r['sweep_best_config']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, summary=summary, sweep=sweeps), f, indent=1, default=str)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mla-passes bench", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
