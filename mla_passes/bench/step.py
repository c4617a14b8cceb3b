"""``mla-passes bench-step`` (``python -m mla_passes.bench.step``): what a decode step gains.

The kernel bench (:mod:`mla_passes.bench.kernel`) times the fused decode prep alone. This
tool times what a user turns the flag on for: a decode step of a stack of
DeepSeek-V3 decoder layers at the dims of one tensor-parallel rank (hidden
7168, q_lora 1536, kv_lora 512, qk_nope 128, qk_rope 64, v 128; H heads per
rank: 128 at TP 1, 16 at TP 8, 8 at TP 16), compiled by torch.compile
(Inductor) and replayed as a CUDA graph, with the passes off and on, on the
same inputs and the same cache.

Each layer, as vLLM runs it for decode:

* RMSNorm, the fused q_a/kv_a projection, RMSNorm of q_c, q_b; kv_c RMSNorm;
* GPT-J RoPE of q_pe and k_pe written the way vLLM's native rotary embedding
  writes it, the rotated q_pe assigned back into q;
* the cache update op (one Triton kernel, the stand-in for vLLM's
  ``concat_and_cache_mla``), fp8 cache;
* the attention op, opaque to torch.compile: inside it, as vLLM's
  ``MLAAttention.forward_impl`` does, the q-absorb (``torch.bmm`` into a
  token-major buffer), the concat + static fp8 quant of q (one kernel), then
  **vLLM's Triton MLA decode kernel** (``decode_attention_fwd`` from
  ``vllm/v1/attention/ops/triton_decode_attention.py``, loaded from a copy of
  vLLM's file by :mod:`mla_passes.bench.loaders.vllm_mla_stub`) over the paged fp8 cache, then
  the W_UV absorb (bmm);
* o_proj, the residual, RMSNorm and a dense gated MLP **stand-in** whose bf16
  weight bytes equal those of DeepSeek-V3's active experts per token at that
  TP (8 routed + 1 shared expert of intermediate 2048, fp8 weights; sharded
  over TP), so the step streams the weights a real MoE step streams for one
  token (a real MoE reads more as tokens pick different experts).

With the passes on, the fusion pass replaces RoPE + cache write + absorb +
concat + quant by our one fused op (Triton kernel) and the attention by the
prepped-q attention op, which runs the same attention kernel.

The attention takes an fp8 q (its ``tl.dot`` runs on the q dtype, fp8 x fp8,
with the q scale folded into the softmax scale). vLLM's own TRITON_MLA
backend feeds this kernel a bf16 q with an fp8 cache; ``--attn-q bf16``
measures that instead (then the prep has no q quant, and the fused op writes
bf16 q).

Reported per (H, context, T): us per layer-step off and on, saving in us and
%, the step's time with the prep removed from the "on" graph (so the prep's
in-step cost and share), that cost over the prep's bytes' time, and the
saving the kernel bench predicts (compile chain minus fused kernel, timed
alone in the same run) beside the measured one. ``--pdl`` also times the "on"
step with the fused kernel launched with programmatic dependent launch.

Correctness: before timing, both graphs run once from the same cache with the
rows they must write poisoned and the output poisoned; the stack output and
every written cache row of every layer are compared off vs on.

``--smoke`` runs the same code on tiny dims on CPU (no CUDA graph, the
attention in torch: labelled, not a measurement) so the tool is checked
before a GPU run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from unittest import mock

import torch

from . import kernel as kernel_bench
from .step_harness import Captured, _backend, _load_attention, _predictions, _prep_removed, compare, probe_attention
from .step_model import DSV3, SMOKE, TP_OF_HEADS, StepModel, _ops, num_kv_splits
from .step_report import print_table, write_plot

HELP = "time a DeepSeek-V3 decode step (N layers, vLLM's Triton MLA attention) with the passes off and on"

# sizes where the option is not given: the GPU run's, and --smoke's
GPU_DEFAULTS = dict(tokens=[1, 8, 32, 64, 128, 256], context=[1024, 4096], layers=4)
SMOKE_DEFAULTS = dict(tokens=[1], context=[64], layers=2)
# sequence i of a step holds ctx - (i % 4) tokens (StepModel.set_step): at least 1 takes ctx >= 4
MIN_CONTEXT = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..diagnostics.argtypes import device, int_in, json_file, output_file, positive_int

    parser.add_argument("--heads", type=positive_int, nargs="+", default=[8, 16, 128])
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=None,
                        help=f"decode tokens per step (default {' '.join(map(str, GPU_DEFAULTS['tokens']))}; "
                             f"--smoke: {' '.join(map(str, SMOKE_DEFAULTS['tokens']))})")
    parser.add_argument("--context", type=int_in(MIN_CONTEXT), nargs="+", default=None,
                        help=f"tokens per sequence (default {' '.join(map(str, GPU_DEFAULTS['context']))}; "
                             f"--smoke: {' '.join(map(str, SMOKE_DEFAULTS['context']))})")
    parser.add_argument("--layers", type=positive_int, default=None,
                        help=f"decoder layers in the stack (default {GPU_DEFAULTS['layers']}; "
                             f"--smoke: {SMOKE_DEFAULTS['layers']})")
    parser.add_argument("--block-size", type=positive_int, default=64)
    parser.add_argument("--reps", type=positive_int, default=15, help="timed batches; the median is reported")
    parser.add_argument("--inner", type=positive_int, default=5, help="graph replays per timed batch")
    parser.add_argument("--attn-q", default="fp8", choices=("fp8", "bf16"),
                        help="q dtype the attention kernel takes (fp8: the prep quantizes q)")
    parser.add_argument("--pdl", action="store_true", help="also time the 'on' step with PDL launches (CUDA)")
    parser.add_argument("--predict-from", type=json_file, metavar="JSON",
                        help="a `mla-passes bench --json` file of this run for the predicted saving "
                             "(else the prep is timed alone here)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny dims on CPU (torch attention, no CUDA graph): checks the tool, not a measurement")
    parser.add_argument("--device", type=device, default=None, help="cuda, cuda:N or cpu (default cuda; --smoke: cpu)")
    parser.add_argument("--json", type=output_file, metavar="PATH")
    parser.add_argument("--plot", type=output_file, metavar="PNG")


def _check_args(args) -> int | None:
    """The rules between options (each value alone was checked when parsed); the exit status of a usage error."""
    from ..diagnostics.argtypes import usage_error

    for name, value in (SMOKE_DEFAULTS if args.smoke else GPU_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, list(value) if isinstance(value, list) else value)
    if args.device is None:
        args.device = "cpu" if args.smoke else "cuda"
    bad = kernel_bench.check_device("bench-step", args.device)
    if bad is not None:
        if not torch.cuda.is_available():
            print("mla-passes bench-step: use --smoke for the CPU check", file=sys.stderr)
        return bad
    if args.pdl and torch.device(args.device).type != "cuda":
        return usage_error("bench-step", "--pdl", f"PDL launches need a CUDA device, --device is {args.device}")
    if args.smoke:
        for option, given in (("--plot", args.plot), ("--predict-from", args.predict_from)):
            if given:
                return usage_error("bench-step", option, "--smoke measures nothing to plot or predict")
    return None


def run(args) -> int:
    bad = _check_args(args)
    if bad is not None:
        return bad
    smoke = args.smoke
    device = torch.device(args.device)
    dims = SMOKE if smoke else DSV3
    if smoke:
        print("[smoke] tiny dims on CPU, torch attention, no CUDA graph: checks the tool, NOT a measurement")
    torch._dynamo.config.cache_size_limit = 512
    torch._dynamo.config.recompile_limit = 512
    os.environ.setdefault("MLA_PASSES_STRICT", "1")

    from mla_passes import MLAPassManager, PassConfig

    bench = kernel_bench
    _ops()
    attn_impl, attn_fn = _load_attention(device, smoke)
    if attn_fn is not None:  # the kernel as we call it, against torch math on the same pages
        for qf in ((True, False) if args.attn_q == "fp8" else (False,)):
            try:
                err = probe_attention(attn_fn, device, qf)
                print(f"attention check (vLLM kernel vs torch math, {'fp8' if qf else 'bf16'} q): rel L2 {err:.2e}")
            except Exception as e:  # noqa: BLE001
                err = float("inf")
                print(f"attention check ({'fp8' if qf else 'bf16'} q) failed: {type(e).__name__}: {e}"[:400])
            # fp8 q: the kernel also rounds k*k_scale and the softmax weights to fp8 for its fp8 dots
            # (3 mantissa bits): a few % of relative error is that precision, not a wrong call
            if not err < (0.1 if qf else 0.02):
                print("the attention check failed: the step's numbers use a kernel called wrongly", file=sys.stderr)
                return 1
    bw = bench._copy_bandwidth(device) if device.type == "cuda" else float("nan")
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, layers=args.layers, dims=dims, attention=attn_impl, attn_q=args.attn_q,
                block_size=args.block_size, copy_bandwidth_TBps=bw / 1e12, smoke=smoke,
                mlp="dense gated bf16 stand-in, weight bytes = DeepSeek-V3's 9 active fp8 experts (2048) / TP")
    print(f"device: {meta['device']}, torch {torch.__version__}; {args.layers} DeepSeek-V3 layers per step, "
          f"attention: {attn_impl} ({'vLLM triton_decode_attention.decode_attention_fwd' if attn_fn else 'torch math'}), "
          f"q into attention: {args.attn_q}, fp8 cache, block size {args.block_size}")
    print("MLP: a dense bf16 STAND-IN whose weight bytes equal DeepSeek-V3's active experts per token at that TP")
    predictions = _predictions(args, args.heads, args.tokens, device, bw) if not smoke else {}

    rows = []
    for H in args.heads:
        torch._dynamo.reset()
        t0 = time.time()
        model = StepModel(H, args, dims, device, attn_impl, attn_fn, seed=H)
        pm = MLAPassManager(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True, no_range_policy="apply"),
                            max_num_seqs=max(args.tokens))
        off_fn = torch.compile(model.module, backend=_backend(None), fullgraph=True)
        on_fn = torch.compile(model.module, backend=_backend(pm), fullgraph=True)
        print(f"[step] H={H}: MLP stand-in intermediate {model.inter}; built in {time.time() - t0:.1f}s",
              file=sys.stderr, flush=True)
        for T in args.tokens:
            for ctx in args.context:
                t1 = time.time()
                positions, hidden = model.inputs(T, ctx, seed=7 * T + ctx)
                if T > 1:
                    torch._dynamo.mark_dynamic(hidden, 0)
                    torch._dynamo.mark_dynamic(positions, 0)
                row = dict(H=H, T=T, context=ctx, tp=TP_OF_HEADS.get(H), kv_splits=num_kv_splits(ctx, model.sms))
                try:
                    calls = lambda: sum(getattr(st, "opaque_prep_calls", 0) for st in model.states.values())  # noqa: E731
                    c0 = calls()
                    off = Captured(off_fn, positions, hidden)
                    c1 = calls()
                    on = Captured(on_fn, positions, hidden)
                    row["opaque_prep_calls"] = dict(off=c1 - c0, on=calls() - c1)
                    row["fused_layers"] = pm.matched_counts.get("mla_qk_rope_kvcache_fusion", 0)
                    row["check"] = compare(model, off, on, T)
                    # off == on proves nothing unless the fusion really replaced every layer's prep
                    row["check"]["ok"] = (row["check"]["ok"] and row["fused_layers"] == args.layers
                                          and row["opaque_prep_calls"]["off"] > 0 and row["opaque_prep_calls"]["on"] == 0)
                    row["off_us"] = off.time_us(args.reps, args.inner) / args.layers
                    row["on_us"] = on.time_us(args.reps, args.inner) / args.layers
                    del off
                    noprep = Captured(on_fn, positions, hidden, ctx=_prep_removed)
                    row["noprep_us"] = noprep.time_us(args.reps, args.inner) / args.layers
                    del noprep
                    if args.pdl and device.type == "cuda":
                        try:
                            pdl = Captured(on_fn, positions, hidden, ctx=lambda: mock.patch.dict(os.environ, MLA_PASSES_PDL="1"))
                            row["check_pdl"] = compare(model, on, pdl, T)  # PDL vs plain launch, same graph
                            row["on_pdl_us"] = pdl.time_us(args.reps, args.inner) / args.layers
                            del pdl
                        except Exception as e:  # noqa: BLE001
                            row["pdl_error"] = f"{type(e).__name__}: {e}"[:400]
                            print(f"[step] PDL H={H} T={T} ctx={ctx} failed: {row['pdl_error']}", file=sys.stderr)
                    del on
                except Exception as e:  # noqa: BLE001 - one failing shape must not hide the others
                    row["error"] = f"{type(e).__name__}: {e}"[:400]
                    print(f"[step] H={H} T={T} ctx={ctx} failed: {row['error']}", file=sys.stderr, flush=True)
                nbytes = bench.min_bytes(T, H, q_out_bytes=1 if model.q_fp8 else 2, cache_bytes=1)
                row["prep_bytes_us"] = nbytes / bw * 1e6 if device.type == "cuda" else None
                row.update({f"pred_{k}": v for k, v in predictions.get((H, T), {}).items()})
                rows.append(row)
                print("[row] " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
                print(f"[step] H={H} T={T} ctx={ctx} done in {time.time() - t1:.1f}s", file=sys.stderr, flush=True)
        model.unregister()
        del model, off_fn, on_fn
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    summary = print_table(rows, smoke, args.pdl)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, summary=summary), f, indent=1, default=str)
    if args.plot and not smoke:
        try:
            write_plot(args.plot, rows, meta)
        except ImportError as e:
            print(f"[step] no plot: {e}", file=sys.stderr)
    bad = [r for r in rows if "error" in r or not r.get("check", {}).get("ok", False)
           or ("check_pdl" in r and not r["check_pdl"]["ok"])]
    if bad:
        print(f"[step] {len(bad)}/{len(rows)} shapes failed or did not match off vs on: "
              + "; ".join(f"H={r['H']} T={r['T']} ctx={r['context']}" for r in bad), file=sys.stderr)
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mla-passes bench-step", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
