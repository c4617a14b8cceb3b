"""What the flag costs a prefill step on vLLM CPU (issue: prep only decode rows?).

vLLM on CPU compiles one graph for every batch size (no compile ranges), so
with the flag on the fused op runs on prefill steps too: it rotates q_pe/k_pe
and writes the cache for every row (work the flag-off graph does as well),
and absorbs + concatenates q for every row, of which the prefill rows are
thrown away (the prepped-q attention sends them to ``forward_mha`` with the
original q). This times, per layer, on CPU with the reference backend:

* ``fused``: the whole ``fused_decode_prep`` call;
* ``wasted``: its q-absorb + concat + cast alone (what a prefill row adds);
* ``decode_rows``: the call as the op makes it on CPU since it preps only
  the decode rows (here none: a pure prefill step; RoPE and cache write
  for every row, the rest of q_out zeroed);
* ``linears``: the layer's projections for the same tokens (q_proj,
  kv_a_proj, kv_b_proj, o_proj), the work a prefill step does anyway,
  for scale.

    python -m tools.bench_cpu_prefill [--tokens 1 4 2048] [--heads 16] [--reps 5]

Defaults are DeepSeek-V2-Lite's attention dims (hidden 2048, 16 heads, qk_nope
128, rope 64, kv_lora 512, v 128), bf16. Prints a table of CPU time (``time.process_time``, one
thread by default); asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mla_passes.kernels import fused_decode_prep
from mla_passes.kernels import check_fused_decode_prep_args
from mla_passes.kernels.reference import absorb_q_nope, finish_q, fused_decode_prep_reference


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.process_time()  # CPU time of this process: steadier than wall time on a shared box
        fn()
        times.append((time.process_time() - t0) * 1e3)
    return statistics.median(times)


def bench(T: int, H: int, reps: int, hidden: int = 2048, P: int = 128, R: int = 64, L: int = 512, V: int = 128,
          dtype=torch.bfloat16) -> dict:
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    q, kv_c, k_pe = rnd(T, H, P + R), rnd(T, L), rnd(T, R)
    w_uk_t = rnd(H, P, L) * 0.05
    max_pos = max(T, 16)
    cos_sin = torch.randn(max_pos, R, generator=g)
    positions = torch.arange(T, dtype=torch.int64)
    block = 16
    kv_cache = torch.zeros((T + block - 1) // block + 1, block, L + R, dtype=dtype)
    slots = torch.arange(T, dtype=torch.int64)
    k_scale = torch.ones(1)
    q_out = torch.empty(T, H, L + R, dtype=dtype)

    def fused():
        fused_decode_prep(q, kv_c, k_pe, w_uk_t, positions, cos_sin, False, slots, kv_cache, "auto",
                          k_scale, None, q_out, backend="reference")

    args = (q, kv_c, k_pe, w_uk_t, positions, cos_sin, False, slots, kv_cache, "auto", k_scale, None, q_out)
    dims = check_fused_decode_prep_args(*args)

    def decode_rows():
        fused_decode_prep_reference(*args, dims, q_rows=0)

    def wasted():
        finish_q(torch.cat((absorb_q_nope(q[..., :P], w_uk_t), q[..., P:].float()), dim=-1), None, q_out)

    x = rnd(T, hidden)
    w_q, w_kva = rnd(hidden, H * (P + R)), rnd(hidden, L + R)
    w_kvb, w_o = rnd(L, H * (P + V)), rnd(H * V, hidden)
    kv_lat, attn = rnd(T, L), rnd(T, H * V)

    def linears():
        x @ w_q, x @ w_kva, kv_lat @ w_kvb, attn @ w_o

    return {"T": T, "H": H, "fused": _median_ms(fused, reps), "wasted": _median_ms(wasted, reps),
            "decode_rows": _median_ms(decode_rows, reps),
            "linears": _median_ms(linears, reps)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 2048])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, per layer, median CPU ms")
    print(f"{'T':>6} {'H':>4} {'fused':>10} {'wasted':>10} {'decode_rows':>12} {'linears':>10} {'wasted/linears':>15}")
    for T in args.tokens:
        r = bench(T, args.heads, args.reps)
        print(f"{r['T']:>6} {r['H']:>4} {r['fused']:>10.3f} {r['wasted']:>10.3f} {r['decode_rows']:>12.3f} "
              f"{r['linears']:>10.3f} "
              f"{r['wasted'] / r['linears']:>15.1%}")


if __name__ == "__main__":
    main()
