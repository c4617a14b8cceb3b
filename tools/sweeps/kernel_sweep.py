"""Launch-config sweep of the fused Triton decode-prep kernel, for one device call.

Times, per (H, T) of the bench grid (DeepSeek-V3 dims, bf16, fp8 cache and q,
8 layers per CUDA graph, as ``mla_passes/bench/kernel.py``): the kernel with its launch
heuristic, with only its absorb programs (``parts=ABSORB``) or only its side
programs (``parts=CACHE_AND_K_ROPE | Q_ROPE``) under candidate configs, and the best absorb x side
combinations. ``--baseline MODULE`` adds another kernel module's
``fused_decode_prep_triton`` (e.g. the previous kernel) as row ``old``.

``--compile-only --shard i/n`` runs each variant once on one layer, so n such
processes started side by side fill Triton's cache before the timing pass.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import torch

HEADS = (16, 128)
TOKENS = (1, 8, 32, 64, 128, 256)
ROUND = 1
SIDES = [(1, 16), (1, 32), (1, 64), (1, 128), (2, 16), (2, 32), (4, 16), (4, 32)]


def absorb_candidates(T: int) -> list[dict]:
    c = []

    def add(bt, bl, nw=4, it=1, gemv=False):
        c.append(dict(BLOCK_T=bt, BLOCK_L=bl, LB_ITERS=it, GEMV=gemv, num_warps=nw, num_stages=2))

    if T <= 4:
        for bl in (16, 32, 64, 128):
            add(1 if T == 1 else 4, bl, gemv=True)
        add(1 if T == 1 else 4, 64, nw=8, gemv=True)
        add(16, 32)
        add(16, 64)
    elif T <= 8:
        add(2, 32, gemv=True)
        add(4, 16, gemv=True)
        add(8, 16, gemv=True)
        for bl in (16, 32, 64, 128):
            add(16, bl)
    elif T <= 32:
        for bt in (16, 32):
            for bl in (32, 64, 128):
                add(bt, bl)
        add(64, 64)
    elif T <= 64:
        for bt in (16, 32, 64):
            for bl in (64, 128):
                add(bt, bl)
        add(64, 128, nw=8)
        add(64, 64, nw=8)
    else:
        for bt in (32, 64, 128):
            for bl in (64, 128):
                add(bt, bl, nw=4 if bt < 128 else 8)
        add(64, 128, nw=8)
        add(128, 128, nw=4)
        add(128, 128, nw=8, it=2)
        add(64, 128, nw=4, it=4)
    return c


def round2(T: int, H: int) -> list[tuple[str, dict | None, int]]:
    """Refinements around the first sweep's winners: column loops (W pipelined),
    warps, stages; the side split at large T*H. All full kernels."""
    c = []

    def add(bt, bl, nw=4, it=1, ns=2, gemv=False, **side):
        cfg = dict(BLOCK_T=bt, BLOCK_L=bl, LB_ITERS=it, GEMV=gemv, num_warps=nw, num_stages=ns, **side)
        lab = f"A bt{bt} bl{bl}x{it} w{nw} s{ns}{' gemv' if gemv else ''}" + "".join(f" {k}{v}" for k, v in side.items())
        c.append((lab + " |full", cfg, 7))

    if T == 1:
        add(1, 64, gemv=True)
        add(1, 64, it=2, ns=3, gemv=True)
        add(1, 32, it=2, ns=3, gemv=True)
        add(1, 32, it=4, ns=3, gemv=True)
        add(1, 64, it=2, ns=2, gemv=True)
        add(1, 128, gemv=True)
        add(1, 32, nw=2, gemv=True)
        add(1, 64, nw=2, gemv=True)
    elif T <= 4:
        add(4, 16, gemv=True)
        add(4, 32, gemv=True)
        add(4, 32, nw=8, gemv=True)
        add(2, 32, gemv=True)
        add(16, 64)
        add(16, 32)
        add(16, 64, it=2, ns=3)
    elif T <= 8:
        add(16, 64)
        add(16, 32)
        add(16, 64, it=2, ns=3)
        add(16, 32, it=2, ns=3)
        add(16, 128, nw=8)
        add(16, 64, nw=2)
    elif T <= 32:
        add(32, 64)
        add(32, 32)
        add(32, 64, it=2, ns=3)
        add(32, 32, it=2, ns=3)
        add(32, 128, nw=8)
        add(16, 64, it=2, ns=3)
    elif T <= 64:
        add(64, 64, nw=8)
        add(64, 32, nw=4)
        add(64, 64, nw=8, it=2, ns=3)
        add(64, 64, nw=4, it=2, ns=3)
        add(64, 128, nw=8)
        add(32, 64)
    else:
        add(128, 64, nw=8)
        add(64, 64, nw=4)
        add(128, 64, nw=8, it=2, ns=3)
        add(64, 128, nw=8)
        add(128, 128, nw=8, it=2, ns=3)
        add(64, 64, nw=4, it=2, ns=3)
        add(128, 32, nw=4)
        if H >= 64:
            for st, sh in ((1, 16), (2, 16), (4, 16), (8, 16), (2, 32)):
                add(128, 64, nw=8, SIDE_T=st, SIDE_H=sh)
    return [("new", None, 7), ("new_absorb", None, 1), ("new_side", None, 6)] + c


def variants(T: int, H: int, default: dict) -> list[tuple[str, dict | None, int]]:
    """(label, config override or None for the heuristic, parts)."""
    if ROUND == 2:
        return round2(T, H)
    out = [("new", None, 7), ("new_absorb", None, 1), ("new_side", None, 6)]
    for cfg in absorb_candidates(T):
        lab = f"A bt{cfg['BLOCK_T']} bl{cfg['BLOCK_L']}x{cfg['LB_ITERS']} w{cfg['num_warps']}{' gemv' if cfg['GEMV'] else ''}"
        out.append((lab + " |abs", cfg, 1))
        out.append((lab + " |full", cfg, 7))
    for st, sh in SIDES:
        if sh > max(16, 1 << (H - 1).bit_length()) or st > max(1, T):
            continue
        out.append((f"S st{st} sh{sh} |side", dict(SIDE_T=st, SIDE_H=sh), 6))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, nargs="+", default=list(HEADS))
    ap.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--baseline", default=None, help="module with an older fused_decode_prep_triton")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default=None)
    ap.add_argument("--round", type=int, default=1, help="1: the broad sweep; 2: refinements, full kernels only")
    args = ap.parse_args(argv)
    global ROUND
    ROUND = args.round

    from mla_passes.kernels import triton_prep
    from mla_passes.bench import kernel as bench

    bargs = argparse.Namespace(dtype="bfloat16", block_size=64)
    dev = torch.device(os.environ.get("SWEEP_DEVICE", "cuda"))
    shard, nshard = map(int, args.shard.split("/"))
    old = importlib.import_module(args.baseline) if args.baseline else None
    results = []
    job = 0
    t_start = time.time()
    for H in args.heads:
        for T in args.tokens:
            n_layers = 1 if args.compile_only else 8
            layers = [bench.Layer(T, H, bargs, seed=1000 * i + T + H, device=dev) for i in range(n_layers)]
            default = triton_prep.launch_config(T, H, 512, dev)
            vs = variants(T, H, default)
            if old is not None:
                vs = [("old", "old", 7)] + vs

            def fn_for(cfg, parts):
                if cfg == "old":
                    return lambda ly: old.fused_decode_prep_triton(*ly.case.kernel_args(), ly.dims)

                full = dict(default, **(cfg or {}))

                def f(ly):
                    return triton_prep.launch(*ly.case.kernel_args(), ly.dims, full, parts=parts)
                return f

            def run_one(label, cfg, parts):
                fn = fn_for(cfg, parts)
                row = dict(H=H, T=T, label=label, cfg=cfg if cfg != "old" else "old", parts=parts)
                try:
                    k = fn(layers[0])
                    if not args.compile_only:
                        row["us"] = bench._time_graph(fn, layers, args.reps, 10)
                        if k is not None:
                            row["regs"], row["spills"] = getattr(k, "n_regs", None), getattr(k, "n_spills", None)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                return row

            for label, cfg, parts in vs:
                job += 1
                if job % nshard != shard:
                    continue
                row = run_one(label, cfg, parts)
                results.append(row)
                if not args.compile_only:
                    print(json.dumps(row), flush=True)
            if not args.compile_only and ROUND == 1:
                # best absorb configs (full kernel) x best side configs (side-only)
                mine = [r for r in results if r["H"] == H and r["T"] == T and "us" in r]
                full = sorted((r for r in mine if r["label"].endswith("|full")), key=lambda r: r["us"])[:2]
                side = sorted((r for r in mine if r["label"].endswith("|side")), key=lambda r: r["us"])[:2]
                for a in full:
                    for s in side:
                        cfg = dict(a["cfg"], **s["cfg"])
                        row = run_one(f"C {a['label'][2:-5]}+ {s['label'][2:-5]}|combo", cfg, 7)
                        results.append(row)
                        print(json.dumps(row), flush=True)
                again = run_one("new (again)", None, 7)
                results.append(again)
                print(json.dumps(again), flush=True)
            layers = None
            torch.cuda.empty_cache()
            print(f"[sweep] H={H} T={T} done at {time.time() - t_start:.0f}s", file=sys.stderr, flush=True)

    if args.compile_only:
        bad = [r for r in results if "error" in r]
        print(f"[compile shard {shard}/{nshard}] {len(results)} variants, {len(bad)} errors "
              f"in {time.time() - t_start:.0f}s")
        for r in bad[:5]:
            print("  ", r)
        return 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=0)
    print("\n   H    T      old      new   absorb     side  | best full kernels (us config)")
    for H in args.heads:
        for T in args.tokens:
            rs = {r["label"]: r for r in results if r["H"] == H and r["T"] == T and "us" in r}
            g = lambda k: rs[k]["us"] if k in rs else float("nan")  # noqa: E731
            full = sorted((r for r in rs.values() if r["label"].endswith(("|full", "|combo"))), key=lambda r: r["us"])
            best = "; ".join(f"{r['us']:.2f} {r['label'][2:].rsplit('|', 1)[0].strip()}" for r in full[:3])
            print(f"{H:>4} {T:>4} {g('old'):8.2f} {g('new'):8.2f} {g('new_absorb'):8.2f} {g('new_side'):8.2f}  | {best}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
