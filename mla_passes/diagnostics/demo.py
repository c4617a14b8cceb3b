"""``mla-passes demo``: the passes on a small MLA decode stack, on CPU.

Builds a decode stack with DeepSeek-V3 head dims (``P=128, L=512, R=64,
V=128``; fewer heads and a small hidden size so it runs in seconds), an fp8
(``uint8``) KV cache and an fp8 attention q, from the stand-in vLLM ops
(:mod:`mla_passes.testing.models`). Compiles it with Inductor twice - passes off, then
passes on (:class:`~mla_passes.MLAPassManager` as the post-grad custom pass) -
each under ``depyf.prepare_debug`` so both dumps can be compared with
``mla-passes diff``. Runs both on the same fresh random inputs (not the ones
the graphs were traced with) from the same cache contents, and checks that
they agree on

* the stack's output (every layer's attention output flows into it),
* the KV cache after the step (written rows within one fp8 step, every other
  byte identical),
* the rotated ``q_pe`` / ``k_pe`` and the prepped q each layer's attention
  received (recorded at run time inside the stand-in attention, so both paths
  are observed the same way).

Prints match counts per pass, an op-count table of the graph before/after the
passes, the max errors, lint findings of the rewritten graph and where the
dumps are. Exit status 1 if anything disagrees (or no pass matched).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

HELP = "compile a small DeepSeek-V3-dims MLA decode stack with the passes off and on, check they agree, show the rewrite"

FULL = dict(layers=4, heads=16, tokens=8)
SHORT = dict(layers=2, heads=4, tokens=4)


# Bounds of the options: the demo stack's KV cache has CACHE_BLOCKS x BLOCK_SIZE slots and a step writes one
# per token; heads and layers stop at DeepSeek-V3's (W_UK_T alone is H x 128 KiB per layer).
CACHE_BLOCKS, BLOCK_SIZE = 8, 16
MAX_TOKENS = CACHE_BLOCKS * BLOCK_SIZE
MAX_HEADS, MAX_LAYERS = 128, 61


def add_arguments(parser) -> None:
    from mla_passes.config import BACKENDS

    from .argtypes import int_in, output_dir, seed_int

    parser.add_argument("--short", action="store_true",
                        help=f"small and fast (layers={SHORT['layers']}, heads={SHORT['heads']}, "
                             f"tokens={SHORT['tokens']}); used by the tests")
    parser.add_argument("--layers", type=int_in(1, MAX_LAYERS, "DeepSeek-V3's layer count"), default=None,
                        help=f"MLA layers (default {FULL['layers']})")
    parser.add_argument("--heads", type=int_in(1, MAX_HEADS, "DeepSeek-V3's head count"), default=None,
                        help=f"attention heads (default {FULL['heads']}; V3 has 128)")
    parser.add_argument("--tokens", type=int_in(1, MAX_TOKENS, "the demo cache's slots"), default=None,
                        help=f"decode tokens in the step (default {FULL['tokens']})")
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--out", type=output_dir, default=None, metavar="DIR",
                        help="where the depyf dumps go (DIR/off, DIR/on); default: a new temp folder")
    parser.add_argument("--no-dump", action="store_true", help="skip the depyf dumps (faster)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="kernel backend of the fused op (default auto)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


@dataclasses.dataclass
class Check:
    name: str
    max_err: float
    tol: float
    ok: bool
    detail: str = ""


@dataclasses.dataclass
class DemoResult:
    config: dict
    matched: dict[str, int]
    patterns: dict[str, int]                  # registered pattern -> its matches in the rewritten layers
    op_table: list[tuple[str, int, int]]      # (target, before, after), changed targets
    total_ops: tuple[int, int]
    checks: list[Check]
    lint_findings: list[str]
    dumps: dict[str, str]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks) and sum(self.matched.values()) > 0 and not self.lint_findings

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        d["op_table"] = [{"target": t, "before": b, "after": a} for t, b, a in self.op_table]
        return d


# --- probing the attention inputs --------------------------------------------

class _AttentionProbe:
    """Records, per layer, what the stand-in attention receives: rotated q_pe,
    rotated k_pe, the prepped q (dequantized). Both the passes-off path (vLLM's
    attention op doing the q-prep inside) and the passes-on path
    (``mla_attention_with_prepped_q``) end in ``standins.standin_attention``."""

    def __init__(self, states: dict):
        self.names = {id(s): n for n, s in states.items()}
        self.records: dict[str, dict] = {}

    @contextlib.contextmanager
    def installed(self):
        from mla_passes.testing import standins

        original = standins.standin_attention

        def probe(state, q, q_prepped, kv_c_normed, k_pe, output):
            P = state.w_uk_t.shape[1]
            qp = q_prepped.float()
            if state.q_scale is not None:
                qp = qp * state.q_scale.float()
            self.records[self.names[id(state)]] = dict(
                q_pe=q[..., P:].float().clone(), k_pe=k_pe.reshape(k_pe.shape[0], -1).float().clone(),
                q_prepped=qp.clone(), q_prepped_raw=q_prepped.clone(),
                q_scale=None if state.q_scale is None else state.q_scale.clone(),
            )
            return original(state, q, q_prepped, kv_c_normed, k_pe, output)

        standins.standin_attention = probe
        try:
            yield self
        finally:
            standins.standin_attention = original


# --- comparing ---------------------------------------------------------------

def _close(name: str, got, ref, *, atol: float, rtol: float) -> Check:
    err = (got - ref).abs()
    bound = atol + rtol * ref.abs()
    excess = (err - bound).max().item() if err.numel() else 0.0
    return Check(name, err.max().item() if err.numel() else 0.0, atol + rtol * ref.abs().max().item(),
                 excess <= 0.0, f"atol={atol:g} rtol={rtol:g}")


def _fp8_close(name: str, got, ref, scale, fp8_dtype) -> Check:
    """Dequantized fp8 values: each element within one fp8 step (of its magnitude)."""
    from mla_passes.testing import fp8_step

    err = (got - ref).abs()
    step = fp8_step(ref / scale, fp8_dtype).float() * scale
    n_diff = int((err > 0).sum())
    ok = bool((err <= step * 1.0001).all())
    return Check(name, err.max().item() if err.numel() else 0.0, step.max().item(), ok,
                 f"<= 1 fp8 step per element; {n_diff}/{err.numel()} codes differ")


def _rel(name: str, got, ref, *, tol: float) -> Check:
    """Relative L2 error ``|got - ref| / |ref|``."""
    err = ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()
    return Check(name, err, tol, err <= tol, "relative L2 error")


def _compare(stack, off: dict, on: dict, eager_out=None) -> list[Check]:
    """Layer 0 sees the same inputs on both sides: element by element, its
    rotated q_pe/k_pe agree to bf16 rounding and its fp8 prepped q and cache
    rows to one fp8 step. Deeper layers see inputs that already differ by
    rounding (bf16 RoPE in the unfused graph vs fp32 in the fused op, an fp8
    code flipped in a layer above), amplified by fp8 quantization: they are
    held to relative L2 errors. Rows the step must not write are compared
    bitwise in every layer."""
    import torch

    from mla_passes.kernels import gather_cache_rows
    from mla_passes.kernels.fp8 import is_fp8_kv_cache, platform_fp8_dtype

    out_on, out_off = on["out"].float(), off["out"].float()
    err = (out_on - out_off).abs().max().item()
    checks = [_rel("stack output", out_on, out_off, tol=3e-2)]
    checks[0].detail += f"; max abs error {err:.3g}"
    if eager_out is not None:
        base = _rel("(for scale) passes off vs eager", out_off, eager_out.float(), tol=float("inf"))
        base.detail = "relative L2 error of compiling alone; not a check"
        checks.append(base)
    worst: dict[str, Check] = {}

    def keep(c: Check) -> None:
        w = worst.get(c.name)
        if w is None or (w.ok and (not c.ok or c.max_err > w.max_err)):
            worst[c.name] = c

    for i, (name, state) in enumerate(stack.states.items()):
        a, b = off["probe"][name], on["probe"][name]
        ca, cb = off["caches"][name], on["caches"][name]
        slots = state.slot_mapping
        written = torch.zeros(ca.shape[0] * ca.shape[1], dtype=torch.bool)
        written[slots[slots >= 0].long().cpu()] = True
        flat_a, flat_b = ca.view(-1, ca.shape[-1]), cb.view(-1, cb.shape[-1])
        idx = written.nonzero().flatten()
        ra = gather_cache_rows(ca, idx, state.kv_cache_dtype, state.k_scale, dtype=torch.float32)
        rb = gather_cache_rows(cb, idx, state.kv_cache_dtype, state.k_scale, dtype=torch.float32)
        fp8_q = a["q_scale"] is not None
        fp8_cache = is_fp8_kv_cache(state.kv_cache_dtype)
        if i == 0:
            keep(_close("layer 0 rotated q_pe (bf16)", b["q_pe"], a["q_pe"], atol=1e-2, rtol=1.6e-2))
            keep(_close("layer 0 rotated k_pe (bf16)", b["k_pe"], a["k_pe"], atol=1e-2, rtol=1.6e-2))
            if fp8_q:
                keep(_fp8_close("layer 0 prepped q (fp8)", b["q_prepped"], a["q_prepped"], a["q_scale"],
                                a["q_prepped_raw"].dtype))
            else:
                keep(_close("layer 0 prepped q", b["q_prepped"], a["q_prepped"], atol=2e-2, rtol=2e-2))
            if fp8_cache:
                keep(_fp8_close("layer 0 cache rows written (fp8)", rb, ra, state.k_scale.float(),
                                platform_fp8_dtype(ca.device)))
            else:
                keep(_close("layer 0 cache rows written", rb, ra, atol=1e-2, rtol=1.6e-2))
        keep(_rel("every layer: rotated q_pe", b["q_pe"], a["q_pe"], tol=2e-2))
        keep(_rel("every layer: rotated k_pe", b["k_pe"], a["k_pe"], tol=2e-2))
        keep(_rel("every layer: prepped q", b["q_prepped"], a["q_prepped"], tol=5e-2))
        keep(_rel("every layer: cache rows written", rb, ra, tol=5e-2))
        untouched_equal = torch.equal(flat_a[~written], flat_b[~written])
        keep(Check("every layer: cache rows not written", 0.0 if untouched_equal else float("inf"), 0.0,
                   untouched_equal,
                   f"{int((~written).sum())} rows per layer bitwise equal" if untouched_equal else "differ"))
    return checks + list(worst.values())


# --- the run -----------------------------------------------------------------

class _PassesThenLint:
    """The pass manager, then the CUDA-graph lint of the rewritten graph
    (findings kept); quacks like the manager for ``TestBackend``."""

    def __init__(self, manager):
        from .lint import lint_graph

        self.manager = manager
        self._lint = lint_graph
        self.findings: list = []
        self.pattern_counts: dict = {}  # registered pattern -> layers it matched, over every graph

    def __call__(self, graph):
        self.manager(graph)
        for p in self.manager.passes:
            for name, n in getattr(p, "pattern_counts", {}).items():
                self.pattern_counts[name] = self.pattern_counts.get(name, 0) + n
        self.findings.extend(self._lint(graph))

    @property
    def matched_counts(self):
        return self.manager.matched_counts

    def uuid(self):
        return self.manager.uuid()


def _run_once(stack, *, passes_on: bool, dump_dir: str | None, tokens: int, seed: int, backend: str,
              snapshot: dict):
    import torch

    from mla_passes.testing.models import set_step
    from mla_passes.testing.backend import TestBackend

    from .dump import dumping

    manager = None
    if passes_on:
        from mla_passes.config import PassConfig
        from mla_passes.pass_manager import MLAPassManager

        kwargs = {"fuse_aiter_qk_rope_kvcache_mla": True}
        if backend != "auto":
            kwargs["backend"] = backend
        manager = _PassesThenLint(MLAPassManager(PassConfig(**kwargs), max_num_seqs=tokens))
    backend_ = TestBackend(manager)
    torch._dynamo.reset()
    compiled = torch.compile(stack.module, backend=backend_, fullgraph=True, dynamic=False)

    # Trace/compile on one set of inputs ...
    ctx = dumping(dump_dir, None) if dump_dir else contextlib.nullcontext()
    stack.restore_caches(snapshot)
    set_step(stack, tokens, seed=seed)
    with ctx, torch.no_grad():
        compiled(*stack.make_inputs(tokens, seed=seed))
    # ... check on fresh ones, from the same cache contents.
    stack.restore_caches(snapshot)
    set_step(stack, tokens, seed=seed + 1)
    probe = _AttentionProbe(stack.states)
    with probe.installed(), torch.no_grad():
        out = compiled(*stack.make_inputs(tokens, seed=seed + 1))
    torch._dynamo.reset()
    return dict(out=out.clone(), caches=stack.snapshot_caches(), probe=probe.records, backend=backend_,
                manager=manager)


def run_demo(*, layers: int, heads: int, tokens: int, seed: int = 0, out: str | None = None,
             dump: bool = True, backend: str = "auto") -> DemoResult:
    from mla_passes.testing.models import build_decode_stack

    t0 = time.time()
    cfg = dict(layers=layers, heads=heads, tokens=tokens, P=128, L=512, R=64, V=128, hidden=256,
               dtype="bfloat16", kv_cache_dtype="fp8", q="fp8", form="raw", rope="gptj", seed=seed)
    stack = build_decode_stack(num_layers=layers, H=heads, P=128, L=512, R=64, V=128, hidden=256,
                               kv_cache_dtype="fp8", q_fp8=True, form="raw", seed=seed,
                               num_blocks=CACHE_BLOCKS, block_size=BLOCK_SIZE,
                               prefix=f"demo{seed}.layers")
    try:
        snapshot = stack.snapshot_caches()
        dumps = {}
        if dump:
            from .dump import prepare_out_dir

            root = Path(out) if out else Path(tempfile.mkdtemp(prefix="mla_passes_demo_"))
            for side in ("off", "on"):
                err = prepare_out_dir(root / side, clean=True)
                if err:
                    raise RuntimeError(err)
                dumps[side] = str(root / side)
        off = _run_once(stack, passes_on=False, dump_dir=dumps.get("off"), tokens=tokens, seed=seed,
                        backend=backend, snapshot=snapshot)
        on = _run_once(stack, passes_on=True, dump_dir=dumps.get("on"), tokens=tokens, seed=seed,
                       backend=backend, snapshot=snapshot)
        # the eager module, same step, for the scale of compile-only rounding
        import torch

        from mla_passes.testing.models import set_step

        stack.restore_caches(snapshot)
        set_step(stack, tokens, seed=seed + 1)
        with torch.no_grad():
            eager_out = stack.module(*stack.make_inputs(tokens, seed=seed + 1)).clone()
        checks = _compare(stack, off, on, eager_out)
    finally:
        stack.unregister()

    b = on["backend"]
    matched: dict[str, int] = {}
    for m in b.matched:
        for k, v in m.items():
            matched[k] = matched.get(k, 0) + v
    before, after = sum(b.counts_before, start=type(b.counts_before[0])()), sum(b.counts_after, start=type(b.counts_after[0])())
    rows = [(t, before.get(t, 0), after.get(t, 0)) for t in sorted(set(before) | set(after))
            if before.get(t, 0) != after.get(t, 0)]
    return DemoResult(
        config=cfg, matched=matched, patterns=dict(sorted(on["manager"].pattern_counts.items())), op_table=rows,
        total_ops=(sum(before.values()), sum(after.values())),
        checks=checks, lint_findings=[str(f) for f in on["manager"].findings], dumps=dumps,
        seconds=round(time.time() - t0, 1),
    )


def format_result(r: DemoResult) -> str:
    c = r.config
    out = [
        f"MLA decode stack: {c['layers']} layers, H={c['heads']}, qk_nope={c['P']} kv_lora={c['L']} "
        f"rope={c['R']} v={c['V']} (DeepSeek-V3 head dims), GPT-J (interleaved) RoPE as DeepSeek uses, "
        f"{c['dtype']}, fp8 KV cache (uint8), fp8 q; T={c['tokens']} decode tokens",
        "",
        "pass matches:",
    ]
    out += [f"  {k:<40} {v}" for k, v in sorted(r.matched.items())] or ["  (none)"]
    out += ["", "registered patterns the fusion matched (matches; RoPE counts q and k of each layer;",
            "`mla-passes patterns NAME` prints one):"]
    out += [f"  {k:<40} {v}" for k, v in r.patterns.items()] or ["  (none)"]
    w = max([len("total"), *(len(t) for t, _, _ in r.op_table)])
    out += ["", f"op counts, post-grad graph before -> after the passes (changed targets):",
            f"  {'target':<{w}}  {'before':>6}  {'after':>6}"]
    out += [f"  {t:<{w}}  {b:>6}  {a:>6}" for t, b, a in r.op_table]
    out += [f"  {'total':<{w}}  {r.total_ops[0]:>6}  {r.total_ops[1]:>6}", "",
            "passes on vs passes off, fresh inputs (error / tolerance):"]
    for ch in r.checks:
        out.append(f"  {'ok  ' if ch.ok else 'FAIL'} {ch.name:<37} {ch.max_err:<9.3g} / {ch.tol:<8.3g} ({ch.detail})")
    out += ["", f"lint (CUDA-graph capture) of the rewritten graph: {len(r.lint_findings)} findings"]
    out += [f"  {f}" for f in r.lint_findings]
    if r.dumps:
        out += ["", "depyf dumps:", f"  passes off: {r.dumps['off']}", f"  passes on:  {r.dumps['on']}",
                f"  compare:    mla-passes diff {r.dumps['off']} {r.dumps['on']} --stage AFTER_POST_GRAD"]
    if sum(r.matched.values()) == 0:
        out.append("\nFAIL: no pass matched")
    out += ["", f"{'OK' if r.ok else 'FAIL'} ({r.seconds:.1f} s)"]
    return "\n".join(out) + "\n"


def run(args) -> int:
    from .argtypes import usage_error

    if args.out is not None and args.no_dump:
        return usage_error("demo", "--out", "names where the dumps go, and --no-dump makes none")
    base = SHORT if args.short else FULL
    kw = {k: base[k] if getattr(args, k) is None else getattr(args, k) for k in ("layers", "heads", "tokens")}
    r = run_demo(**kw, seed=args.seed, out=args.out, dump=not args.no_dump, backend=args.backend)
    if args.json:
        print(json.dumps(r.to_json(), indent=2))
    else:
        sys.stdout.write(format_result(r))
    return 0 if r.ok else 1
