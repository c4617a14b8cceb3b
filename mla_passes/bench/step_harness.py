"""The harness of ``mla-passes bench-step`` (:mod:`.step`): compile a
:class:`.step_model.StepModel` with the passes off and on, capture and replay
it, check off against on (the poisoned rows each must write, the stack
output), load the attention kernel, and the kernel bench's prediction.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time

import torch

from . import kernel as kernel_bench
from .step_model import _mla_state_cls

# ------------------------------------------------------------------ compile, run, time

def _backend(pm):
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        # no compile caches: a cached graph would skip the passes, and their match counts with them
        patch = {"fx_graph_cache": False}
        if pm is not None:
            patch["post_grad_custom_post_pass"] = pm
        with torch._inductor.config.patch(patch), torch._functorch.config.patch(enable_autograd_cache=False):
            return compile_fx(gm, example_inputs)

    return backend


@contextlib.contextmanager
def _prep_removed():
    """The fused op's kernel launch left out (timing only: the step's time without the prep)."""
    from mla_passes.kernels import triton_prep

    saved = triton_prep.fused_decode_prep_triton
    triton_prep.fused_decode_prep_triton = lambda *a, **k: None
    try:
        yield
    finally:
        triton_prep.fused_decode_prep_triton = saved


class Captured:
    """``fn(positions, hidden)`` captured in a CUDA graph (or, on CPU, called)."""

    def __init__(self, fn, positions, hidden, ctx=contextlib.nullcontext):
        self.fn, self.positions, self.hidden = fn, positions, hidden
        self.cuda = hidden.is_cuda
        with ctx(), torch.no_grad():
            if not self.cuda:
                self.out = fn(positions, hidden)
                return
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    fn(positions, hidden)
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = fn(positions, hidden)
        torch.cuda.synchronize()

    def run(self):
        if self.cuda:
            self.graph.replay()
        else:
            with torch.no_grad():
                self.out = self.fn(self.positions, self.hidden)
        return self.out

    def time_us(self, reps, inner) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            for _ in range(inner):
                self.run()
            return (time.perf_counter() - t0) * 1e6 / inner
        for _ in range(3):
            self.graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                self.graph.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / inner)
        return statistics.median(times)


def _written_rows(model, T):
    """Every layer's cache rows at this step's slots, dequantized: [layers, T, L+R]."""
    from mla_passes.kernels import gather_cache_rows

    rows = []
    for st in model.states.values():
        rows.append(gather_cache_rows(st.kv_cache, st.slot_mapping[:T], "fp8", st.k_scale, dtype=torch.float32))
    return torch.stack(rows)


def _poison(model, captured, T):
    for st in model.states.values():
        flat = st.kv_cache.view(-1, st.kv_cache.shape[-1])
        flat[st.slot_mapping[:T]] = 0x7F  # an fp8 e4m3fn NaN: a row the step does not write stays NaN
    if captured.out is not None:
        captured.out.fill_(float("nan"))


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def compare(model, off: Captured, on: Captured, T: int) -> dict:
    """Both graphs once from the same poisoned rows; output and written rows off vs on."""
    from mla_passes.testing import fp8_step

    _poison(model, off, T)
    out_off = off.run().clone()
    rows_off = _written_rows(model, T)
    _poison(model, on, T)
    out_on = on.run().clone()
    rows_on = _written_rows(model, T)
    if out_off.is_cuda:
        torch.cuda.synchronize()
    ks = next(iter(model.states.values())).k_scale.float()
    r0_off, r0_on = rows_off[0] / ks, rows_on[0] / ks
    steps0 = ((r0_on - r0_off).abs() / fp8_step(torch.maximum(r0_on.abs(), r0_off.abs()), model.fp8)).max()
    res = dict(
        output_rel_l2=_rel(out_on, out_off),
        cache_rel_l2=_rel(rows_on, rows_off),
        layer0_cache_max_fp8_steps=float(steps0),
        finite=bool(torch.isfinite(out_on).all() and torch.isfinite(out_off).all()
                    and torch.isfinite(rows_on).all() and torch.isfinite(rows_off).all()),
    )
    # layer 0 sees the same inputs both ways (one fp8 step); later layers inherit rounding differences
    res["ok"] = bool(res["finite"] and res["layer0_cache_max_fp8_steps"] <= 1.01  # one step, float slack
                     and res["cache_rel_l2"] < 0.05 and res["output_rel_l2"] < 0.05)
    return res




def _load_attention(device, smoke):
    if smoke or device.type != "cuda":
        return "torch", None
    # the loader reads vLLM's kernel file from .whl/ of the checkout or the installed vLLM (optional)
    from mla_passes.bench.loaders.vllm_mla_stub import load_decode_attention_fwd

    return "vllm-triton", load_decode_attention_fwd()


def _predictions(args, heads, tokens, device, bw):
    """Kernel-bench numbers for the step's shapes: fused and compile chain (us per layer)."""
    out = {}
    if args.predict_from:  # an existing JSON object (checked when parsed)
        with open(args.predict_from) as f:
            data = json.load(f)
        for title, rows in data.get("tables", {}).items():
            want = "fp8 cache + fp8 q" if args.attn_q == "fp8" else "fp8 cache + bf16 q"
            if not title.endswith(want) or "gptj" not in title:
                continue
            for r in rows:
                out[(r["H"], r["T"])] = dict(fused_us=r.get("fused_us"), compile_us=r.get("compile_us"),
                                             source=args.predict_from)
    missing = [(H, T) for H in heads for T in tokens if (H, T) not in out]
    if missing and device.type == "cuda":
        bench = kernel_bench

        ns = argparse.Namespace(dtype="bfloat16", block_size=args.block_size, pad_every=0, layers=8)
        case = "fp8" if args.attn_q == "fp8" else "fp8kv"
        variants = bench._variants(["fused", "compile"], False, device, case)
        for H, T in missing:
            layers = [bench.Layer(T, H, ns, seed=1000 * i + T + H, device=device, case=case) for i in range(8)]
            out[(H, T)] = dict(source="timed here (8 layers per graph)",
                               **{f"{n}_us": bench._time_graph(fn, layers, 15, 10) for n, fn in variants.items()})
            del layers
    return out


def probe_attention(attn_fn, device, q_fp8: bool, H: int = 16, seed: int = 0) -> float:
    """vLLM's kernel through :meth:`StepLayer.attend` against the torch math on the
    same paged fp8 cache (ragged lengths, shuffled blocks): relative L2 error."""
    from mla_passes.kernels.fp8 import platform_fp8_dtype, quantize_fp8

    StepLayer = _mla_state_cls()
    g = torch.Generator(device=device).manual_seed(seed)
    T, P, L, R, V, bs, nb = 3, 128, 512, 64, 128, 64, 12
    fp8 = platform_fp8_dtype(device)
    k_scale = torch.tensor([0.02], device=device)
    cache = quantize_fp8(torch.randn(nb, bs, L + R, generator=g, device=device), k_scale, fp8).view(torch.uint8)
    q_scale = torch.tensor([0.02], device=device) if q_fp8 else None
    q = torch.randn(T, H, L + R, generator=g, device=device)
    qp = quantize_fp8(q, q_scale, fp8) if q_fp8 else q.to(torch.bfloat16)
    w_uv = (torch.randn(H, L, V, generator=g, device=device) / math.sqrt(L)).to(torch.bfloat16)
    block_table = torch.randperm(nb, generator=g, device=device)[: T * 4].view(T, 4).to(torch.int32)
    outs = []
    for impl in ("vllm-triton", "torch"):
        st = StepLayer(w_uk_t=torch.zeros(H, P, L, dtype=torch.bfloat16, device=device), kv_cache=cache,
                       slot_mapping=torch.zeros(0, dtype=torch.int64, device=device), kv_cache_dtype="fp8",
                       k_scale=k_scale, q_scale=q_scale, q_fp8_dtype=fp8 if q_fp8 else None, w_uv=w_uv,
                       softmax_scale=1.0 / math.sqrt(P + R), attn_impl=impl, attn_fn=attn_fn)
        st.q_scale_value = float(q_scale.item()) if q_fp8 else 1.0
        st.block_table, st.kv_splits = block_table, 2
        st.seq_lens = torch.tensor([200, 77, 256], dtype=torch.int32, device=device)
        out = torch.empty(T, H * V, dtype=torch.bfloat16, device=device)
        st.attend(qp, out)
        outs.append(out.float())
    return _rel(outs[0], outs[1])
