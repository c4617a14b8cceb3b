"""Time ``MLAPassManager`` on synthetic DeepSeek-V3 decode graphs.

    python -m mla_passes.bench.passes [--layers 8 61 122] [--repeats 5]

Builds a decode stack per layer count (DeepSeek-V3 attention dims, 16 heads =
128 / TP8, raw RoPE form, GPT-J), captures its post-grad-like graph once
(aot_autograd with Inductor's decompositions), then times the pass manager on
fresh copies of that graph. Prints one row per layer count with the time per
call and per layer; the per-layer time should stay flat (linear growth).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

HELP = "time the mla-passes pass manager on synthetic DeepSeek-V3 decode graphs"


def capture_graph(num_layers: int, *, H: int, T: int, form: str) -> torch.fx.Graph:
    from mla_passes.testing.backend import capture_graph as capture
    from mla_passes.testing.models import build_decode_stack

    stack = build_decode_stack(num_layers, H=H, hidden=64, form=form, num_blocks=2, block_size=16)
    return capture(stack.module, stack, T)


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    g = torch.fx.Graph()
    out = g.graph_copy(graph, {})
    g.output(out)
    return g


def bench(layers, *, repeats: int = 5, H: int = 16, T: int = 8, form: str = "raw") -> list[dict]:
    from mla_passes import MLAPassManager, PassConfig

    rows = []
    for n in layers:
        graph = capture_graph(n, H=H, T=T, form=form)
        pm = MLAPassManager(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True), max_num_seqs=256)
        times = []
        for i in range(repeats + 1):
            g = copy_graph(graph)
            t0 = time.perf_counter()
            pm(g)
            dt = time.perf_counter() - t0
            if i > 0:  # the first call pays the one-off RoPE check and op lookups
                times.append(dt)
            assert pm.matched_counts["mla_qk_rope_kvcache_fusion"] == n, pm.matched_counts
        med = statistics.median(times)
        rows.append(dict(layers=n, nodes=len(graph.nodes), ms=med * 1e3, ms_per_layer=med * 1e3 / n,
                         first_ms=None))
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, nargs="+", default=[8, 61, 122])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--form", choices=["raw", "fused_rope"], default="raw")


def run(args) -> int:
    rows = bench(args.layers, repeats=args.repeats, H=args.heads, T=args.tokens, form=args.form)
    print(f"{'layers':>7} {'nodes':>7} {'ms/call':>9} {'ms/layer':>9}")
    for r in rows:
        print(f"{r['layers']:>7} {r['nodes']:>7} {r['ms']:>9.2f} {r['ms_per_layer']:>9.3f}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=HELP)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
