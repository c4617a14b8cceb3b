"""``mla-passes report``: per layer fused / lifted / left alone, each refusal's
reason, each graph's gating decision, and the likely cause when nothing was
rewritten, read from the records the pass manager writes
(:mod:`mla_passes.records`, read back by :mod:`mla_passes.diagnostics.report`). Real compiles of the stand-in decode stack."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch._inductor.config as inductor_config

from mla_passes import records
from mla_passes.config import PassConfig
from mla_passes.ops import LayerName
from mla_passes.testing.models import build_decode_stack, set_step
from mla_passes.pass_manager import MLAPassManager
from mla_passes import cli
from mla_passes.diagnostics.report import likely_cause, read_records, summarize

PREFIX = "reporttest.layers"


def _compile_stack(manager, T: int, *, num_layers: int = 2, form: str = "raw"):
    """Compile and run the stand-in stack once with ``manager`` as the post-grad pass."""
    torch._dynamo.reset()
    stack = build_decode_stack(num_layers=num_layers, H=2, form=form, prefix=PREFIX)
    try:
        set_step(stack, T)
        with inductor_config.patch(post_grad_custom_post_pass=manager, fx_graph_cache=False), torch.no_grad():
            torch.compile(stack.module, fullgraph=True, dynamic=False)(*stack.make_inputs(T))
    finally:
        stack.unregister()


def _report(capsys, folder, *extra):
    rc = cli.main(["report", str(folder), *extra])
    return rc, capsys.readouterr().out


def test_fused_layers_listed_with_gating(tmp_path, capsys):
    """Each layer of a decode graph is reported fused, with the graph's range, threshold and policy."""
    m = MLAPassManager(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True), max_num_seqs=8)
    records.attach(m, tmp_path)
    _compile_stack(m, 3)
    rc, out = _report(capsys, tmp_path)
    assert rc == 0
    for i in range(2):
        assert f"layer {PREFIX}.{i}.self_attn.attn: fused" in out
    assert "gating: passes ran: no compile range; token count <= 3 within bucket <= 8" in out
    assert "threshold 8, policy infer" in out
    assert "MLA ops before: attention 2, kv_cache_update 2, fused_rope 0" in out
    assert "-- 2 layer(s): 2 fused, 0 lifted, 0 left alone" in out
    rc, js = _report(capsys, tmp_path, "--json")
    data = json.loads(js)
    assert data["summary"]["totals"] == {"fused": 2}
    assert data["graphs"][0]["matched_counts"]["mla_qk_rope_kvcache_fusion"] == 2
    # which registered patterns took the layers (GPT-J RoPE: q and k per layer), and the time per pass
    assert data["graphs"][0]["pattern_counts"]["rope_gptj_native"] == 4
    assert set(data["graphs"][0]["pass_ms"]) == {"mla_qk_rope_kvcache_fusion", "mla_decode_q_prep_lift"}
    assert "registered patterns matched: " in out and "rope_gptj_native 4" in out
    assert re.search(r"pass time: mla_qk_rope_kvcache_fusion \d+\.\d ms", out)


def test_lifted_layer_carries_the_fusion_refusal(tmp_path, capsys):
    """A layer the fusion refused but the lift took is 'lifted', with the fusion's recorded reason."""
    m = MLAPassManager(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True, fuse_rope_kvcache_cat_mla=False),
                       max_num_seqs=8)
    records.attach(m, tmp_path)
    _compile_stack(m, 3, num_layers=1)
    rc, out = _report(capsys, tmp_path)
    assert rc == 0
    assert f"layer {PREFIX}.0.self_attn.attn: lifted" in out
    assert "refused by mla_qk_rope_kvcache_fusion: raw RoPE form and fuse_rope_kvcache_cat_mla is off" in out
    # the marker the recorder puts on the passes never leaks out of a call
    assert all(type(p.refusals) is list for p in m.passes)


def test_outside_decode_range_says_so(tmp_path, capsys):
    """A graph larger than the decode bucket: layers left alone, the gating reason shown, cause in words."""
    m = MLAPassManager(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True), max_num_seqs=2)
    records.attach(m, tmp_path)
    _compile_stack(m, 5, num_layers=1)
    rc, out = _report(capsys, tmp_path)
    assert rc == 1
    assert "gating: left alone: no compile range; token count <= 5 outside bucket <= 2" in out
    assert f"layer {PREFIX}.0.self_attn.attn: left alone" in out
    assert "-- nothing fused or lifted: every graph was outside the decode range" in out


def test_split_graph_is_named_as_the_cause(tmp_path, capsys):
    """A graph holding a cache update but no attention (vLLM split at attention) is diagnosed as split."""
    stack = build_decode_stack(num_layers=1, H=2, prefix=PREFIX)
    set_step(stack, 3)
    from mla_passes.testing import standins

    name = f"{PREFIX}.0.self_attn.attn"
    state = stack.states[name]

    def piece(kv_c, k_pe):
        return standins.kv_cache_update(kv_c, k_pe, LayerName(name), state.kv_cache_dtype, state.k_scale)

    m = MLAPassManager(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True), max_num_seqs=8)
    records.attach(m, tmp_path)
    torch._dynamo.reset()
    try:
        with inductor_config.patch(post_grad_custom_post_pass=m, fx_graph_cache=False), torch.no_grad():
            torch.compile(piece, fullgraph=True, dynamic=False)(
                torch.randn(3, 512, dtype=torch.bfloat16), torch.randn(3, 1, 64, dtype=torch.bfloat16))
    finally:
        stack.unregister()
    rc, out = _report(capsys, tmp_path)
    assert rc == 1
    assert "MLA ops before: attention 0, kv_cache_update 1, fused_rope 0" in out
    assert "no MLA layer seen: the graph was split at attention" in out
    assert "use_inductor_graph_partition=True" in out


def test_flag_off_and_empty_folder_causes():
    """The report's plain-words causes for a flag-off vLLM config and for a folder without records."""
    off = [{"kind": "vllm_config", "flag": False, "mode": "DYNAMO_TRACE_ONCE"}]
    assert likely_cause([], off).startswith("the flag is off")
    on = [{"kind": "vllm_config", "flag": True, "mode": "VLLM_COMPILE", "enforce_eager": False}]
    assert "compile cache" in likely_cause([], on)
    assert summarize([])["cause"].startswith("no graph was recorded")


def test_report_exit_status_without_records(tmp_path, capsys):
    """An empty folder is trouble (2) and says why; a missing one names the argument."""
    rc, out = _report(capsys, tmp_path)
    assert rc == 2 and "no graph was recorded" in out
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "argument DIR" in capsys.readouterr().err


def test_no_record_folder_means_no_work(monkeypatch):
    """Without a record folder the recorder computes nothing and leaves the passes' refusals alone."""
    monkeypatch.delenv(records.ENV_DIR, raising=False)
    m = MLAPassManager(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True), max_num_seqs=8)
    assert records.sinks_of(m) == []
    _compile_stack(m, 3, num_layers=1)
    assert m.matched_counts["mla_qk_rope_kvcache_fusion"] == 1
    assert all(p.refusals == [] for p in m.passes)


def test_unwritable_record_folder_never_fails_the_compile(tmp_path):
    """A record folder that cannot be written (a file) is logged and the compile goes on, rewritten."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    m = MLAPassManager(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True), max_num_seqs=8)
    records.attach(m, blocker / "sub", write_graphs=True)
    _compile_stack(m, 3, num_layers=1)
    assert m.matched_counts["mla_qk_rope_kvcache_fusion"] == 1


def test_attached_graph_files_pair_for_diff(tmp_path, capsys):
    """With write_graphs the before/after graphs land beside the record and `mla-passes diff` shows the rewrite."""
    m = MLAPassManager(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True), max_num_seqs=8)
    records.attach(m, tmp_path, write_graphs=True)
    _compile_stack(m, 3, num_layers=1)
    rec = [r for r in read_records(tmp_path) if r["kind"] == "graph"][0]
    rc = cli.main(["diff", "--no-text", str(tmp_path / rec["before_file"]), str(tmp_path / rec["after_file"])])
    out = capsys.readouterr().out
    assert rc == 1
    assert re.search(r"mla_passes\.mla_fused_decode_prep\.default\s+0\s+1\s+\+1\n", out)
    assert re.search(r"mla_passes_standin\.unified_mla_kv_cache_update\.default\s+1\s+0\s+-1\n", out)


@pytest.mark.parametrize("env_too", [False, True])
def test_records_go_to_attached_and_env_folders(tmp_path, monkeypatch, env_too):
    """The attached folder gets the record; $MLA_PASSES_EXPLAIN_DIR gets it too when set (no duplicate)."""
    a, e = tmp_path / "attached", tmp_path / "env"
    if env_too:
        monkeypatch.setenv(records.ENV_DIR, str(e))
    else:
        monkeypatch.delenv(records.ENV_DIR, raising=False)
    m = MLAPassManager(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True), max_num_seqs=8)
    records.attach(m, a)
    _compile_stack(m, 3, num_layers=1)
    assert len(read_records(a)) == 1
    assert len(read_records(e)) == (1 if env_too else 0)


def _fake_vllm_config(tmp_path, *, flag: bool, mode: str, dump: bool = True):
    from types import SimpleNamespace

    root = tmp_path / "dbg" if dump else None

    class Cfg(SimpleNamespace):
        def compile_debug_dump_path(self):
            return None if root is None else root / "rank_0_dp_0"

    cc = SimpleNamespace(pass_config=SimpleNamespace(fuse_aiter_qk_rope_kvcache_mla=flag),
                         mode=SimpleNamespace(name=mode), use_inductor_graph_partition=False,
                         splitting_ops=["vllm::unified_mla_attention_with_output"], compile_ranges_endpoints=[4],
                         debug_dump_path=root)
    return Cfg(compilation_config=cc, scheduler_config=SimpleNamespace(max_num_seqs=4),
               model_config=SimpleNamespace(enforce_eager=False))


@pytest.mark.parametrize("mode,writes_graphs", [("VLLM_COMPILE", False), ("DYNAMO_TRACE_ONCE", True)])
def test_vllm_debug_dump_path_routes(tmp_path, monkeypatch, mode, writes_graphs):
    """debug_dump_path: records go to <path>/rank_0_dp_0; we write graphs only where vLLM runs no depyf (not VLLM_COMPILE)."""
    monkeypatch.delenv(records.ENV_DIR, raising=False)
    cfg = _fake_vllm_config(tmp_path, flag=True, mode=mode)
    m = MLAPassManager(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True), max_num_seqs=4)
    records.note_vllm_config(cfg, m)
    [sink] = records.sinks_of(m)
    assert sink["dir"] == str(tmp_path / "dbg" / "rank_0_dp_0")
    assert sink["write_graphs"] is writes_graphs and sink["source"] == "vLLM plugin"
    [rec] = read_records(tmp_path / "dbg")
    assert rec["kind"] == "vllm_config" and rec["flag"] is True and rec["mode"] == mode


def test_vllm_without_dump_path_writes_nothing(tmp_path, monkeypatch):
    """No debug_dump_path and no $MLA_PASSES_EXPLAIN_DIR: the plugin attaches nothing and writes nothing."""
    monkeypatch.delenv(records.ENV_DIR, raising=False)
    monkeypatch.chdir(tmp_path)
    m = MLAPassManager(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True), max_num_seqs=4)
    records.note_vllm_config(_fake_vllm_config(tmp_path, flag=True, mode="VLLM_COMPILE", dump=False), m)
    assert records.sinks_of(m) == [] and list(tmp_path.iterdir()) == []


def test_split_vllm_compile_config_named_when_nothing_seen():
    """VLLM_COMPILE with graph partition off and graphs without MLA ops: the cause names the split."""
    cfg = [{"kind": "vllm_config", "flag": True, "mode": "VLLM_COMPILE", "use_inductor_graph_partition": False}]
    g = [{"kind": "graph", "decision": {"ran": True}, "layers": [],
          "ops_before": {"attention": 0, "kv_cache_update": 0, "fused_rope": 0}}]
    assert "split at attention (vLLM VLLM_COMPILE with graph partition off)" in likely_cause(g, cfg)


def test_vllm_config_noted_into_dump_folder(tmp_path, monkeypatch, capsys):
    """Under `mla-passes dump` ($MLA_PASSES_EXPLAIN_DIR, no debug_dump_path) a flag-off vLLM config is recorded: report says flag off."""
    monkeypatch.setenv(records.ENV_DIR, str(tmp_path / "dump"))
    records.note_vllm_config(_fake_vllm_config(tmp_path, flag=False, mode="DYNAMO_TRACE_ONCE", dump=False))
    rc, out = _report(capsys, tmp_path / "dump")
    assert rc == 1
    assert "flag off, mode DYNAMO_TRACE_ONCE" in out and "-- no MLA layer seen: the flag is off" in out
    m = MLAPassManager(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True), max_num_seqs=4)
    records.note_vllm_config(_fake_vllm_config(tmp_path, flag=True, mode="DYNAMO_TRACE_ONCE", dump=False), m)
    assert [(s["dir"], s["source"], s["write_graphs"]) for s in records.sinks_of(m)] == [
        (str(tmp_path / "dump"), "vLLM plugin", False)]


def test_attention_backend_named_per_graph_and_in_summary(tmp_path, capsys, monkeypatch):
    """The backend the layer resolver names (vLLM: AMX_MLA or CPU_MLA on CPU) is in each layer's
    record, on each graph's report and in the summary; a resolver that names none adds no line."""
    import dataclasses

    from mla_passes import layers

    resolve = layers.resolve_layer
    monkeypatch.setattr(layers, "resolve_layer",
                        lambda name: dataclasses.replace(resolve(name), attention_backend="TEST_MLA"))
    m = MLAPassManager(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True), max_num_seqs=8)
    records.attach(m, tmp_path / "named")
    _compile_stack(m, 3)
    rc, out = _report(capsys, tmp_path / "named")
    assert rc == 0
    assert "  attention backend: TEST_MLA\n" in out
    assert "-- attention backend: TEST_MLA (vLLM's choice for this machine" in out
    rc, js = _report(capsys, tmp_path / "named", "--json")
    data = json.loads(js)
    assert {lay["attention_backend"] for lay in data["graphs"][0]["layers"]} == {"TEST_MLA"}
    assert data["summary"]["attention_backends"] == ["TEST_MLA"]

    monkeypatch.setattr(layers, "resolve_layer", resolve)
    m = MLAPassManager(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True), max_num_seqs=8)
    records.attach(m, tmp_path / "unnamed")
    _compile_stack(m, 3)
    rc, out = _report(capsys, tmp_path / "unnamed")
    assert rc == 0 and "attention backend" not in out


def test_vllm_config_line_shows_what_vllm_derived(tmp_path, monkeypatch, capsys):
    """The config line shows the block size, token budget and backend asked for, as vLLM's config holds them."""
    from types import SimpleNamespace

    monkeypatch.setenv(records.ENV_DIR, str(tmp_path / "dump"))
    cfg = _fake_vllm_config(tmp_path, flag=False, mode="VLLM_COMPILE", dump=False)
    cfg.cache_config = SimpleNamespace(block_size=128)
    cfg.scheduler_config = SimpleNamespace(max_num_seqs=4, max_num_batched_tokens=16, enable_chunked_prefill=True)
    cfg.attention_config = SimpleNamespace(backend=SimpleNamespace(name="CPU_MLA"))
    records.note_vllm_config(cfg)
    rc, out = _report(capsys, tmp_path / "dump")
    assert "max_num_seqs 4, threshold override None, block size 128, max_num_batched_tokens 16, " \
           "attention backend asked CPU_MLA\n" in out, out
    [rec] = read_records(tmp_path / "dump")
    assert rec["enable_chunked_prefill"] is True and rec["block_size"] == 128


def test_model_code_form_named_instead_of_zero_fused():
    """Attention calls whose q (or RoPE/cache write) the model code already did: the cause says no layer had the expected form."""
    cfg = [{"kind": "vllm_config", "flag": True, "mode": "VLLM_COMPILE", "use_inductor_graph_partition": True}]
    g = [{"kind": "graph", "decision": {"ran": True}, "layers": [],
          "ops_before": {"attention": 2, "kv_cache_update": 1, "fused_rope": 0},
          "forms_before": {"attention": 2, "q_prepared_in_model": 1, "no_rope_or_cache_op": 1}}]
    cause = likely_cause(g, cfg)
    assert cause.startswith("no layer of the expected form found: of 2 MLA attention call(s)")
    assert "1 take a decode q the model code already prepared" in cause and "model code" in cause
    g[0]["forms_before"]["no_rope_or_cache_op"] = 0  # one layer of the expected form: the per-layer reasons apply
    assert "refused each one" in likely_cause(g, cfg)
    g[0]["forms_before"].update(q_prepared_in_model=0, no_rope_or_cache_op=2)  # vLLM split the graph at both ops
    cfg[0]["use_inductor_graph_partition"] = False
    assert not likely_cause(g, cfg).startswith("no layer of the expected form")


def test_mla_model_without_known_ops_named():
    """An MLA model whose graphs hold none of the ops the passes know: said in words, with the vLLM version."""
    cfg = [{"kind": "vllm_config", "flag": True, "mode": "VLLM_COMPILE", "use_inductor_graph_partition": True,
            "use_mla": True, "vllm_version": "0.35.0"}]
    g = [{"kind": "graph", "decision": {"ran": True}, "layers": [],
          "ops_before": {"attention": 0, "kv_cache_update": 0, "fused_rope": 0}}]
    cause = likely_cause(g, cfg)
    assert cause.startswith("no layer of the expected form found: vLLM runs this model as MLA")
    assert "(vLLM 0.35.0)" in cause and "nothing was fused" in cause
