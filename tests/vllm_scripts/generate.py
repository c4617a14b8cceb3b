"""A plain vLLM script as a user writes one (used by tests/test_tools_report.py
and pasted in the README): the tiny model, greedy, a few tokens.

    python generate.py MODEL_DIR on|off [DEBUG_DUMP_PATH]

``on``/``off``: pass_config.fuse_aiter_qk_rope_kvcache_mla; DEBUG_DUMP_PATH:
compilation_config.debug_dump_path.
"""

import sys

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def main() -> None:
    model_dir, flag = sys.argv[1], sys.argv[2] == "on"
    cc = {"pass_config": {"fuse_aiter_qk_rope_kvcache_mla": flag}}
    if len(sys.argv) > 3:
        cc["debug_dump_path"] = sys.argv[3]
    llm = LLM(model=model_dir, skip_tokenizer_init=True, max_model_len=128, dtype="bfloat16",
              max_num_seqs=4, kv_cache_memory_bytes=64 << 20, seed=0, compilation_config=cc)
    prompts = [TokensPrompt(prompt_token_ids=[(7 * i + 3 * n) % 500 + 3 for i in range(n)]) for n in (5, 9)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    print("tokens:", [list(o.outputs[0].token_ids) for o in outs])


if __name__ == "__main__":
    main()
