"""The report of ``mla-passes bench-step`` (:mod:`.step`): the derived
columns (saving, prep share, in-step prep cost, prediction), the table and
the plot.
"""

from __future__ import annotations

import math
import statistics

from .step_model import TP_OF_HEADS

def _f(x, spec="7.2f"):
    return format(x, spec) if isinstance(x, (int, float)) and x is not None and math.isfinite(x) else f"{'-':>7}"


def derived(r: dict) -> dict:
    """Saving, prep share, in-step prep cost and its ratio to the bytes' time, prediction."""
    d = {}
    off, on, nop = r.get("off_us"), r.get("on_us"), r.get("noprep_us")
    if off and on:
        d["saving_us"] = off - on
        d["saving_pct"] = 100 * (off - on) / off
    if on and nop is not None:
        d["prep_in_step_us"] = on - nop
        d["prep_share_on_pct"] = 100 * (on - nop) / on
        if off:
            d["chain_in_step_us"] = off - nop  # the unfused chain inside the off step (same noprep rest)
            d["prep_share_off_pct"] = 100 * (off - nop) / off
        if r.get("prep_bytes_us"):
            d["prep_over_bytes"] = (on - nop) / r["prep_bytes_us"]
    pf, pc = r.get("pred_fused_us"), r.get("pred_compile_us")
    if pf and pc:
        d["pred_saving_us"] = pc - pf
    if r.get("on_pdl_us") and on:
        d["pdl_gain_us"] = on - r["on_pdl_us"]
    return d


def print_table(rows, smoke, pdl) -> dict:
    label = " [SMOKE: CPU, torch attention, not a measurement]" if smoke else ""
    print(f"\n## decode step, us per layer (stack time / layers){label}")
    cols = ["H", "ctx", "T", "off", "on", "saving", "save%", "pred", "noprep", "chain_in", "pr_chain", "prep_in",
            "pr_fused", "share%", "x_bytes"]
    if pdl:
        cols += ["on_pdl", "pdl_gain"]
    cols += ["match"]
    print(" ".join(f"{c:>7}" for c in cols))
    for r in rows:
        d = derived(r)
        r.update(d)
        vals = [f"{r['H']:>7}", f"{r['context']:>7}", f"{r['T']:>7}", _f(r.get("off_us")), _f(r.get("on_us")),
                _f(d.get("saving_us")), _f(d.get("saving_pct"), "7.1f"), _f(d.get("pred_saving_us")),
                _f(r.get("noprep_us")), _f(d.get("chain_in_step_us")), _f(r.get("pred_compile_us")),
                _f(d.get("prep_in_step_us")), _f(r.get("pred_fused_us")), _f(d.get("prep_share_on_pct"), "7.1f"),
                _f(d.get("prep_over_bytes"))]
        if pdl:
            vals += [_f(r.get("on_pdl_us")), _f(d.get("pdl_gain_us"))]
        c = r.get("check")
        vals += [f"{'ok' if c and c['ok'] else ('ERR' if 'error' in r else 'DIFF'):>7}"]
        print(" ".join(vals))
    print("off/on: passes off/on; saving = off - on; pred = the kernel bench's saving at that (H, T) "
          "(compile chain - fused kernel, each timed alone); noprep = the 'on' step with the fused kernel "
          "left out; chain_in = off - noprep (the unfused chain inside the step; pr_chain: the kernel bench's "
          "compile chain alone); prep_in = on - noprep (the fused prep inside the step; pr_fused: alone), "
          "share% of the on step; "
          "x_bytes = prep_in / (prep bytes / copy bandwidth)")
    timed = [r for r in rows if "prep_over_bytes" in r]
    over = [r for r in timed if r["prep_over_bytes"] > 1.5]
    summary = dict(shapes=len(rows), matched=sum(1 for r in rows if r.get("check", {}).get("ok")))
    if timed:
        worst = max(timed, key=lambda r: r["prep_over_bytes"])
        summary.update(worst_prep_over_bytes=worst["prep_over_bytes"], target_prep_1_5x_bytes=not over)
        gap = "met" if not over else (f"MISSED at {len(over)}/{len(timed)} shapes, worst by "
                                      f"{worst['prep_over_bytes'] / 1.5:.2f}x (H={worst['H']} T={worst['T']} "
                                      f"ctx={worst['context']})")
        print(f"in-step fused prep / its bytes' time: worst {worst['prep_over_bytes']:.2f}x (target <= 1.5x: {gap})")
    pairs = [r for r in rows if "pred_saving_us" in r and "saving_us" in r]
    if pairs:
        ratio = statistics.median(r["saving_us"] / r["pred_saving_us"] for r in pairs if r["pred_saving_us"] > 0)
        summary["median_measured_over_predicted_saving"] = ratio
        print(f"measured / predicted saving: median {ratio:.2f} over {len(pairs)} shapes")
    print(f"off vs on outputs and caches match at {summary['matched']}/{len(rows)} shapes")
    return summary


def write_plot(path, rows, meta) -> None:
    """Step time per layer against T, passes off vs on, one panel per H (both contexts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = sorted({r["H"] for r in rows})
    fig, axes = plt.subplots(1, len(heads), figsize=(4.4 * len(heads), 3.6), squeeze=False)
    for j, H in enumerate(heads):
        ax = axes[0][j]
        for k, ctx in enumerate(sorted({r["context"] for r in rows})):
            rs = sorted((r for r in rows if r["H"] == H and r["context"] == ctx and r.get("on_us")),
                        key=lambda r: r["T"])
            if not rs:
                continue
            ts = [r["T"] for r in rs]
            ax.plot(ts, [r["off_us"] for r in rs], color=f"C{2 * k + 1}", marker="s", ls="--",
                    label=f"passes off, ctx {ctx}")
            ax.plot(ts, [r["on_us"] for r in rs], color=f"C{2 * k}", marker="o", ls="-",
                    label=f"passes on, ctx {ctx}")
        ax.set_xscale("log", base=2)
        ax.set_title(f"H={H} (TP {TP_OF_HEADS.get(H)})", fontsize=9)
        ax.set_xlabel("tokens T (decode sequences)")
        ax.set_ylabel("us per layer-step")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"DeepSeek-V3 decode step, {meta['layers']} layers, {meta['device']} (CUDA-graph replay; "
                 f"vLLM Triton MLA attention, fp8 cache + fp8 q; MLP: dense stand-in)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")
