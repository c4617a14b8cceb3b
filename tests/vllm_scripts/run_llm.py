"""One vLLM process for tests/test_vllm_e2e.py: build the LLM in one mode,
generate greedily, write everything the tests check to a JSON file.

    python run_llm.py MODEL_DIR OUT_JSON MODE      MODE in {on, lift, off, eager,
                                                         compile_on, compile_off, compile_nopart,
                                                         tp_on, tp_off}

``on``: pass_config.fuse_aiter_qk_rope_kvcache_mla=True plus a user post-grad
pass (graph probe); ``lift``: the same, with only the q-prep lift pass kept
in the manager (so the lift is seen on vLLM's real graph, not just the
fusion that subsumes it); ``off``: the same user pass, flag off; ``eager``:
enforce_eager=True. ``compile_*``: ``mode=VLLM_COMPILE`` kept on CPU by
``vllm_compile_on_cpu.py`` (the caller sets ``MLA_TEST_VLLM_COMPILE=1`` and puts
``site/`` on PYTHONPATH): flag on, flag off, flag on with
``use_inductor_graph_partition=False``. ``tp_*``: flag on/off with
``tensor_parallel_size=2``. The probe and the instrumented pass manager append JSON
lines to OUT_JSON + ".jsonl" from inside the worker process.
"""

import json
import os
import sys

PROMPT_LENS = (5, 9, 40)  # staggered (below), later steps mix decode rows with prefill rows on either CPU MLA backend
MAX_TOKENS = 16


def main() -> None:
    model_dir, out_json, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    os.environ["PYTHONPATH"] = here + os.pathsep + os.environ.get("PYTHONPATH", "")
    os.environ["MLA_PROBE_OUT"] = out_json + ".jsonl"
    os.environ["MLA_PROBE_INSTRUMENT"] = "1"

    from graph_probe import GraphProbePass
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    result: dict = {"mode": mode}
    kwargs = dict(model=model_dir, skip_tokenizer_init=True, max_model_len=128, dtype="bfloat16",
                  max_num_seqs=4, max_num_batched_tokens=16, kv_cache_memory_bytes=64 << 20, seed=0)
    if mode == "eager":
        kwargs["enforce_eager"] = True
    else:
        cc = {"inductor_compile_config": {"post_grad_custom_post_pass": GraphProbePass("user")}}
        if mode == "lift":
            os.environ["MLA_PROBE_ONLY_PASSES"] = "lift"  # read by the instrumented manager in the worker
        if mode in ("on", "lift", "compile_on", "compile_nopart", "tp_on"):
            cc["pass_config"] = {"fuse_aiter_qk_rope_kvcache_mla": True}
        if mode.startswith("compile_"):
            cc["mode"] = 3  # CompilationMode.VLLM_COMPILE
        if mode == "compile_nopart":
            cc["use_inductor_graph_partition"] = False
        if mode.startswith("tp_"):
            kwargs["tensor_parallel_size"] = 2
        kwargs["compilation_config"] = cc

    backend = os.environ.get("MLA_TEST_ATTENTION_BACKEND")  # e.g. CPU_MLA: force vLLM's reference CPU MLA backend
    if backend:
        kwargs["attention_config"] = {"backend": backend}

    if mode == "on":
        result.update(config_checks())

    llm = LLM(**kwargs)
    vcfg = llm.llm_engine.vllm_config
    ccfg = vcfg.compilation_config
    post = ccfg.inductor_compile_config.get("post_grad_custom_post_pass")
    result["post_pass_type"] = type(post).__name__ if post is not None else None
    result["post_pass_members"] = [type(p).__name__ for p in getattr(post, "passes", [])]
    result["pass_config_flag"] = getattr(ccfg.pass_config, "fuse_aiter_qk_rope_kvcache_mla", None)
    result["compile_ranges_endpoints"] = ccfg.compile_ranges_endpoints
    result["compilation_mode"] = int(ccfg.mode)
    result["use_inductor_graph_partition"] = ccfg.use_inductor_graph_partition
    result["splitting_ops"] = ccfg.splitting_ops
    # What vLLM derived from this machine (on CPU the MLA backend, AMX or not, decides
    # block size, chunked prefill and the token budget, and so the top compile range).
    import torch

    result["cpu_has_amx"] = bool(torch.cpu._is_amx_tile_supported())
    result["attention_backend_asked"] = backend
    result["block_size"] = vcfg.cache_config.block_size
    result["max_num_batched_tokens"] = vcfg.scheduler_config.max_num_batched_tokens
    result["enable_chunked_prefill"] = bool(vcfg.scheduler_config.enable_chunked_prefill)
    result["max_num_seqs"] = vcfg.scheduler_config.max_num_seqs
    prompts = [TokensPrompt(prompt_token_ids=[(7 * i + 3 * n) % 500 + 3 for i in range(n)]) for n in PROMPT_LENS]
    result["tokens"] = generate_staggered(llm, prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                                       ignore_eos=True))
    with open(out_json, "w") as f:
        json.dump(result, f, indent=1)


def generate_staggered(llm, prompts, params) -> list[list[int]]:
    """Greedy tokens per prompt, the first prompt added one engine step before
    the others: its decode rows then share steps with their prefill rows (a
    mixed step), whatever the timing of the engine-core process. (With the
    reference CPU_MLA backend vLLM turns chunked prefill off and raises the
    token budget, so prompts added together would be prefilled together and
    no step would mix; AMX_MLA keeps chunked prefill and the budget of 16.)"""
    engine = llm.llm_engine
    done: dict[str, list[int]] = {}

    def step() -> None:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)

    engine.add_request("0", prompts[0], params)
    step()  # the first prompt's prefill, alone
    for i, prompt in enumerate(prompts[1:], 1):
        engine.add_request(str(i), prompt, params)
    while engine.has_unfinished_requests():
        step()
    return [done[str(i)] for i in range(len(prompts))]


def config_checks() -> dict:
    """Config-surface facts, checked in this (main) process before the LLM."""
    from pydantic import ValidationError
    from vllm.config import CompilationConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    out = {}
    try:
        CompilationConfig(pass_config={"fuse_aiter_qk_rope_kvcache_mla_typo": True})
        out["unknown_key_rejected"] = False
    except ValidationError:
        out["unknown_key_rejected"] = True
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", "x", "-cc.pass_config.fuse_aiter_qk_rope_kvcache_mla=true"])
    out["cli_flag"] = AsyncEngineArgs.from_cli_args(args).compilation_config.pass_config.fuse_aiter_qk_rope_kvcache_mla
    try:
        args = parser.parse_args(["--model", "x", "-cc.pass_config.not_a_real_key=true"])
        AsyncEngineArgs.from_cli_args(args)
        out["cli_unknown_rejected"] = False
    except (ValidationError, SystemExit, ValueError):
        out["cli_unknown_rejected"] = True
    return out


if __name__ == "__main__":
    main()
