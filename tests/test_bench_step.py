"""The decode-step benchmark's CPU-runnable parts: its sizing rules and a smoke run
(tiny dims, torch attention) that must fuse every layer and match passes off vs on."""

from __future__ import annotations

import json

import pytest
import torch

from mla_passes.bench import step as bench_step, step_model, step_report


def test_mlp_stand_in_matches_active_expert_bytes():
    """The dense bf16 stand-in streams DeepSeek-V3's 9 active fp8 experts' bytes, sharded over TP."""
    for H, tp in ((128, 1), (16, 8), (8, 16)):
        inter = step_model.mlp_stand_in_intermediate(H)
        dense_bytes = 3 * 7168 * inter * 2
        moe_bytes = 9 * 3 * 7168 * 2048 * 1 / tp
        assert dense_bytes == moe_bytes, (H, inter)


def test_num_kv_splits_follows_vllm_rule():
    """One split per whole 512 tokens, rounded up to a power of two, at most 2 per SM."""
    assert [step_model.num_kv_splits(n, 132) for n in (100, 1024, 1500, 1600, 4096)] == [1, 2, 2, 4, 8]
    assert step_model.num_kv_splits(1 << 20, 4) == 8


def test_derived_numbers():
    """Saving, in-step prep cost and its ratio to the bytes' time come from the measured fields."""
    d = step_report.derived(dict(off_us=20.0, on_us=15.0, noprep_us=12.0, prep_bytes_us=2.0,
                                pred_fused_us=3.0, pred_compile_us=10.0))
    assert d["saving_us"] == 5.0 and d["saving_pct"] == 25.0
    assert d["prep_in_step_us"] == 3.0 and d["prep_over_bytes"] == 1.5 and d["pred_saving_us"] == 7.0


def test_smoke_step_fuses_every_layer_and_matches(tmp_path, capsys):
    """The smoke run (CPU, tiny dims) fuses both layers' prep, and the stack output and the
    written cache rows agree passes off vs on (a step left unfused would fail the check)."""
    torch._dynamo.reset()
    out = tmp_path / "step.json"
    rc = bench_step.main(["--smoke", "--heads", "4", "--tokens", "1", "3", "--context", "40",
                          "--layers", "2", "--block-size", "16", "--reps", "1", "--inner", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    assert rc == 0, capsys.readouterr().err
    assert [r["T"] for r in data["rows"]] == [1, 3]
    for r in data["rows"]:
        assert r["fused_layers"] == 2 and r["opaque_prep_calls"]["on"] == 0 and r["opaque_prep_calls"]["off"] > 0
        assert r["check"]["ok"] and r["check"]["finite"], r
    assert "SMOKE" in capsys.readouterr().out


_INTERP_ATTENTION = r"""
import math, os, sys
import torch
from mla_passes.bench import step_harness, step_model
from mla_passes.bench.loaders.vllm_mla_stub import load_decode_attention_fwd

fn = load_decode_attention_fwd()
StepLayer = step_model._mla_state_cls()
g = torch.Generator().manual_seed(0)
T, H, P, L, R, V, bs, nb = 3, 16, 128, 512, 64, 128, 16, 64
cache = torch.randn(nb, bs, L + R, generator=g).to(torch.float16)
w_uv = (torch.randn(H, L, V, generator=g) / math.sqrt(L)).to(torch.float16)
bt = torch.randperm(nb, generator=g)[: T * 16].view(T, 16).to(torch.int32)
q = torch.randn(T, H, L + R, generator=g).to(torch.float16)
outs = []
for impl in ("vllm-triton", "torch"):
    st = StepLayer(w_uk_t=torch.zeros(H, P, L, dtype=torch.float16), kv_cache=cache,
                   slot_mapping=torch.zeros(0, dtype=torch.int64), kv_cache_dtype="auto", w_uv=w_uv,
                   softmax_scale=1 / math.sqrt(P + R), attn_impl=impl, attn_fn=fn)
    st.q_scale_value, st.block_table, st.kv_splits = 1.0, bt, 2
    st.seq_lens = torch.tensor([200, 77, 256], dtype=torch.int32)
    out = torch.full((T, H * V), float("nan"), dtype=torch.float16)
    st.attend(q, out)
    outs.append(out.float())
print("REL", step_harness._rel(outs[0], outs[1]))
"""


def test_vllm_triton_attention_call_matches_torch_math_in_interpreter():
    """Our call of vLLM's Triton MLA decode kernel (paged cache view, block table, ragged
    lengths, KV splits) gives what torch math over the same pages gives (Triton's CPU
    interpreter, fp16: its bf16 dot is wrong). Skipped where vLLM's file is not found."""
    import os
    import subprocess
    import sys

    from mla_passes.bench.loaders import vllm_mla_stub

    if vllm_mla_stub._source_file() is None:
        pytest.skip("vLLM's triton_decode_attention.py not found (no vLLM, no .whl/vllm_triton)")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tools/ is not installed: run in the checkout
    res = subprocess.run([sys.executable, "-c", _INTERP_ATTENTION], env=env, capture_output=True, text=True,
                         timeout=300, cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    rel = float(res.stdout.split("REL")[-1])
    assert rel < 2e-3, rel
