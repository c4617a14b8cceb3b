"""A tiny DeepSeek-V2 with random weights, written offline for vLLM tests.

The dimensions are the smallest vLLM's CPU MLA backends run (kv_lora_rank 512
+ rope 64 = head size 576); ``first_k_dense_replace`` equals the number of
layers so no MoE layer is built. Weights are random (fixed seed); the
initializer scale is raised so greedy logits are well separated and a wrong
attention result changes the generated tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TINY_CONFIG = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=128,
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=128,
    first_k_dense_replace=2,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    max_position_embeddings=256,
    initializer_range=0.08,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
)

NUM_MLA_LAYERS = TINY_CONFIG["num_hidden_layers"]


def build_tiny_deepseek_v2(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write config + random safetensors weights to ``out_dir`` (idempotent)."""
    out = Path(out_dir)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = DeepseekV2Config(**{k: v for k, v in TINY_CONFIG.items() if k != "torch_dtype"})
    config.architectures = ["DeepseekV2ForCausalLM"]
    model = DeepseekV2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


if __name__ == "__main__":
    import sys

    print(build_tiny_deepseek_v2(sys.argv[1]))
