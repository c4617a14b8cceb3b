"""Real vLLM on a GPU with the flag on (``tools/gpu_vllm.py``).

The GPU test runs the whole check grid (tiny DeepSeek-V2/V3; FLASH_ATTN_MLA, FLASHMLA, TRITON_MLA;
bf16 and fp8 caches; FULL_AND_PIECEWISE and FULL_DECODE_ONLY), flag off vs on, in vLLM's default
GPU compile mode: tokens equal or diverging only after a near-tie, KV-cache rows within one unit in
the last place, every layer fused in the decode range and nowhere else. It needs CUDA and vLLM
(on the GPU machine: ``tools/gpu_check.sh vllm``). The CPU tests hold the criterion itself to
account: it must reject what it exists to catch.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tools import gpu_vllm  # noqa: E402

N = gpu_vllm.MAX_TOKENS


def _run(tokens, logprobs):
    return {"tokens": tokens, "logprobs": logprobs}


def _lp(top1, top2, n=N):
    return [[[top1, 5], [top2, 6]] for _ in range(n)]


def test_tokens_identical_pass():
    """Identical tokens and logprobs: the token criterion holds, nothing after a difference."""
    off = _run([[5] * N], [_lp(-0.1, -3.0)])
    ok, text, first = gpu_vllm.compare_tokens(off, off)
    assert ok and text == "tokens identical" and first == [N]


def test_tokens_divergence_after_near_tie_passes_and_otherwise_fails():
    """A difference is accepted only where the off run's top-2 were within TIE_NATS (it must be able to fail)."""
    off = _run([[5] * N], [_lp(-0.70, -0.70 - gpu_vllm.TIE_NATS / 2)])
    on = _run([[5] * 7 + [6] * (N - 7)], [_lp(-0.70, -0.71)])
    ok, text, first = gpu_vllm.compare_tokens(off, on)
    assert ok and first == [7] and "near-tie" in text
    off_clear = _run([[5] * N], [_lp(-0.1, -2.0)])
    ok, text, _ = gpu_vllm.compare_tokens(off_clear, on)
    assert not ok and "NOT a near-tie" in text


def test_tokens_logprob_drift_fails():
    """Same tokens but the chosen token's logprob drifted beyond LOGPROB_NATS: a wrong result, refused."""
    off = _run([[5] * N], [_lp(-0.1, -3.0)])
    on = _run([[5] * N], [_lp(-0.1 - 2 * gpu_vllm.LOGPROB_NATS["auto"], -3.0)])
    ok, text, _ = gpu_vllm.compare_tokens(off, on)
    assert not ok and "logprob off by" in text


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_cache_rows_within_rounding_and_no_more(tmp_path, kv):
    """Layer-0 rows within the rounding bound pass; a row off by more fails unless written after a token difference."""
    torch.manual_seed(0)
    vals = torch.randn(2, 4, 16, 576)  # layers, blocks, rows, width
    if kv == "fp8":
        base = vals.to(torch.float8_e4m3fn).view(torch.uint8)
        near = base.clone()
        near[0, 1, 0, 0] = (int(base[0, 1, 0, 0]) & 0x80) | max((int(base[0, 1, 0, 0]) & 0x7F) - 1, 0)
    else:
        base = vals.to(torch.bfloat16)
        near = base.clone()
        near[0, 1, 0, 530] = near[0, 1, 0, 530] + torch.finfo(torch.bfloat16).eps * near[0, 1, 0, 512:].abs().max() / 2
    far = near.clone()
    far[0, 2, 3, 7] = far[0, 2, 3, 7] + 100  # a wrong row in layer 0
    far[1, 2, 3, 7] = far[1, 2, 3, 7] + 100  # deeper layers are reported, not bounded
    for name, t in (("off", base), ("near", near), ("far", far)):
        torch.save(list(t.unbind(0)), tmp_path / f"{name}.pt")
    ok, text = gpu_vllm.compare_caches(tmp_path / "off.pt", tmp_path / "near.pt", kv, [N])
    assert ok and "1 differ at all, 0 beyond" in text, text
    ok, text = gpu_vllm.compare_caches(tmp_path / "off.pt", tmp_path / "far.pt", kv, [N])
    assert not ok and "1 beyond the rounding bound" in text, text
    ok, _ = gpu_vllm.compare_caches(tmp_path / "off.pt", tmp_path / "far.pt", kv, [N - 1])
    assert ok  # one row may hold another token: the sequence differed at its last token


def _graph_record(rng, outcomes):
    return {"kind": "graph", "decision": {"ran": True, "range": rng},
            "layers": [{"layer": f"model.layers.{i}.self_attn", "outcome": o, "reasons": []} for i, o in enumerate(outcomes)]}


@pytest.mark.parametrize("records, ok", [
    ([([1, 4], ["fused"] * 3), ([5, 8192], ["left alone"] * 3)], True),
    ([(None, ["fused"] * 3)], True),  # a compile mode without ranges: its one graph
    ([([1, 4], ["fused", "fused", "lifted"])], False),  # one layer short of fused
    ([([1, 4], ["fused"] * 2)], False),  # a layer missing
    ([([1, 4], ["fused"] * 3), ([5, 8192], ["left alone", "fused", "left alone"])], False),  # outside the range
    ([], False),  # nothing compiled with the passes (a cache hit): nothing shown
])
def test_report_wants_every_layer_fused_in_the_decode_range_only(tmp_path, records, ok):
    dump = tmp_path / "h16_mla_passes_dump" / "rank_0_dp_0"
    dump.mkdir(parents=True)
    (dump / "mla_passes_explain.1.jsonl").write_text("".join(json.dumps(_graph_record(*r)) + "\n" for r in records))
    result = {"_path": str(tmp_path / "h16_mla_passes.json"), "max_num_seqs": 4}
    got, text = gpu_vllm.check_report(result, True, 3)
    assert got is ok, text
    rewritten = any(o != "left alone" for _, outcomes in records for o in outcomes)
    assert gpu_vllm.check_report(result, False)[0] is not rewritten  # flag off: nothing may be rewritten


def test_decode_steps_are_the_most_frequent_token_count():
    prefill_hit = [(16 * 64, 900.0)]  # the first forward: each prompt's last block recomputed
    decode = [(16, 100.0 + i) for i in range(8)]
    tail = [(8, 60.0)]  # requests finishing apart
    assert gpu_vllm.decode_steps(prefill_hit + decode + tail) == (16, [100.0 + i for i in range(8)])
    assert gpu_vllm.decode_steps([(32, 5.0), (16, 3.0)]) == (16, [3.0])  # a tie: the smaller count
    assert gpu_vllm.decode_steps([]) == (0, [])


def test_step_kv_cache_holds_the_largest_batch_at_the_longest_context():
    for layers, batch, ctx, n in ((16, 256, 4096, 64), (16, 1, 1024, 64), (2, 7, 100, 3)):
        need = layers * gpu_vllm._FP8_CACHE_BYTES_PER_TOKEN * batch * (ctx + 1 + n)
        assert need < gpu_vllm.step_kv_cache_bytes(layers, batch, ctx, n) <= max(1.3 * need, 256 << 20)


@pytest.mark.gpu
@pytest.mark.vllm
def test_real_vllm_on_gpu(tmp_path):
    """The whole grid on real vLLM, flag off vs on; every case that can run here passes, and at least one runs."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("vllm", reason="needs vLLM (on the GPU machine: ../shared/gpu-vllm kit)")
    rc = gpu_vllm.main(["check", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "check.json").read_text())
    assert rc == 0, json.dumps(rows, indent=1)
    assert all(r["ok"] is not False for r in rows) and any(r["ok"] for r in rows)
