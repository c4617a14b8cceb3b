"""Real vLLM on a GPU with the flag on (``mla_passes.tools.gpu_vllm``).

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
from mla_passes.tools import gpu_vllm  # noqa: E402

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
    on = _run([[5] * N], [_lp(-0.1 - 2 * gpu_vllm.LOGPROB_NATS, -3.0)])
    ok, text, _ = gpu_vllm.compare_tokens(off, on)
    assert not ok and "logprob off by" in text


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_cache_rows_one_unit_and_no_more(tmp_path, kv):
    """Cache rows one code apart pass; two codes apart fail unless written after a token difference."""
    torch.manual_seed(0)
    if kv == "fp8":
        base = (torch.randn(4, 16, 576) * 3).to(torch.float8_e4m3fn).view(torch.uint8)
        step = base.clone()
        step[0, 0, 0] = (int(base[0, 0, 0]) & 0x80) | max((int(base[0, 0, 0]) & 0x7F) - 1, 0)
    else:
        base = torch.randn(4, 16, 576).to(torch.bfloat16)
        step = base.clone()
        step.view(torch.int16)[0, 0, 0] += 1
    far = step.clone()
    far.view(torch.int8 if kv == "fp8" else torch.int16)[1, 2, 3] ^= 0x30
    for name, t in (("off", base), ("one", step), ("far", far)):
        torch.save([t], tmp_path / f"{name}.pt")
    ok, text = gpu_vllm.compare_caches(tmp_path / "off.pt", tmp_path / "one.pt", kv, [N])
    assert ok and text.startswith("1 rows differ at all, 0 by more"), text
    ok, text = gpu_vllm.compare_caches(tmp_path / "off.pt", tmp_path / "far.pt", kv, [N])
    assert not ok, text
    ok, _ = gpu_vllm.compare_caches(tmp_path / "off.pt", tmp_path / "far.pt", kv, [N - 1])
    assert ok  # one row may hold another token: the sequence differed at its last token


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
