"""Run the tiny model once with a graph-probe post-grad pass (exploration aid)."""
import json
import os
import sys

if __name__ == "__main__":
    model_dir, out = sys.argv[1], sys.argv[2]
    os.environ["MLA_PROBE_OUT"] = out
    sys.path.insert(0, os.path.dirname(__file__))
    os.environ["PYTHONPATH"] = os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")
    from graph_probe import GraphProbePass
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_dir, skip_tokenizer_init=True, max_model_len=128, dtype="bfloat16",
              max_num_seqs=4, kv_cache_memory_bytes=64 << 20, compilation_config={"inductor_compile_config": {"post_grad_custom_post_pass": GraphProbePass()}})
    cc = llm.llm_engine.vllm_config.compilation_config
    print("MODE", cc.mode, "BACKEND", cc.backend, "CUSTOM_OPS", cc.custom_ops, "RANGES", getattr(cc, "compile_ranges_endpoints", None))
    prompts = [TokensPrompt(prompt_token_ids=list(range(3, 3 + n))) for n in (5, 9, 14)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]))
