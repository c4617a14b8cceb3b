"""``mla-passes dump`` runs a user script under depyf with the passes off/on;
``mla-passes diff`` on the two real dumps shows the rewrite."""

from __future__ import annotations

import os
import re
import textwrap

import pytest

from mla_passes import cli
from mla_passes.diagnostics.diff import compare_paths
from mla_passes.diagnostics.graph_files import collect_graph_files

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    from mla_passes.testing.models import build_decode_stack, set_step

    T = int(sys.argv[1])
    stack = build_decode_stack(num_layers=1, H=2, kv_cache_dtype="fp8", q_fp8=True,
                               prefix="dumptest.layers")
    set_step(stack, T)
    f = torch.compile(stack.module, fullgraph=True, dynamic=False)
    with torch.no_grad():
        f(*stack.make_inputs(T))
    stack.unregister()
    print("script ran with T =", T)
''')


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    root = tmp_path_factory.mktemp("dump")
    script = root / "user_script.py"
    script.write_text(SCRIPT)
    out = {}
    for side in ("off", "on"):
        out[side] = root / side
        assert cli.main(["dump", "--out", str(out[side]), "--passes", side, "--", str(script), "3"]) == 0
    return root, script, out


def test_dump_leaves_pass_graphs_only_with_passes_on(dumps):
    _, _, out = dumps
    off, on = (collect_graph_files(out[s]) for s in ("off", "on"))
    assert any(k.stage == "AFTER_POST_GRAD" for k in off) and any(k.stage == "AFTER_POST_GRAD" for k in on)
    assert not any(k.stage.startswith("mla_passes_") for k in off)
    ours = sorted(k.stage for k in on if k.stage.startswith("mla_passes_"))
    # before/after graph of each pass the manager ran (fusion, lift)
    assert len(ours) >= 2 and len(ours) % 2 == 0
    assert {s.replace("mla_passes_before_", "").replace("mla_passes_after_", "") for s in ours} == {
        s.replace("mla_passes_before_", "") for s in ours if s.startswith("mla_passes_before_")}


def test_diff_of_real_dumps_shows_the_rewrite(dumps):
    _, _, out = dumps
    pairs = {p.key: p for p in compare_paths(out["off"], out["on"])}
    post = pairs["fn0.AFTER_POST_GRAD.0"]
    assert post.status == "changed"
    delta = post.changed_ops()
    # the one layer's attention is replaced by the prepped-q attention
    assert delta["mla_passes_standin.unified_mla_attention_with_output.default"] == -1
    assert delta["mla_passes.mla_attention_with_prepped_q.default"] == 1
    # and its q-prep is in the graph now, fused or lifted
    assert delta.get("mla_passes.mla_fused_decode_prep.default", 0) + \
        delta.get("mla_passes.mla_decode_q_prep.default", 0) == 1
    only_b = [k for k, p in pairs.items() if p.status == "only_b"]
    assert only_b and all(".mla_passes_" in k for k in only_b)
    # graphs before the post-grad passes are the same with and without them
    assert pairs["fn0.Captured_Graph.0"].status == "identical"
    assert pairs["fn0.Forward_graph.0"].status == "identical"


def test_dump_refuses_a_non_empty_folder_and_passes_exit_status(dumps, tmp_path, capsys):
    root, script, out = dumps
    assert cli.main(["dump", "--out", str(out["off"]), "--passes", "off", "--", str(script), "3"]) == 2
    assert "not empty" in capsys.readouterr().err
    failing = tmp_path / "fails.py"
    failing.write_text("import sys\nsys.exit(3)\n")
    assert cli.main(["dump", "--out", str(tmp_path / "d"), "--passes", "off", "--", str(failing)]) == 3
    assert cli.main(["dump", "--out", str(tmp_path / "e"), "--", str(tmp_path / "missing.py")]) == 2


def test_dump_summary_line(dumps, capsys, tmp_path):
    """The summary names the folder and the number of graph files; cheap rerun on a trivial script."""
    trivial = tmp_path / "t.py"
    trivial.write_text("import torch\nprint(torch.compile(lambda x: x.sin() + 1)(torch.ones(3)).sum().item())\n")
    assert cli.main(["dump", "--out", str(tmp_path / "t"), "--passes", "off", "--", str(trivial)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"mla-passes dump: \d+ graph files in .*/t/ \(passes off\)", out)
    assert "5.52" in out  # the script's own output: 3 * (sin(1) + 1)


def test_dump_summary_counts_recorded_layers(dumps):
    """The summary reads the records in the dump (any manager, any process), not a counter of its own manager."""
    from mla_passes.diagnostics.report import read_records
    from mla_passes.diagnostics.dump import summary_line

    _, _, out = dumps
    line = summary_line(out["on"])
    assert "pass manager called on 1 graph, ran on 1; matches: " in line
    assert "1 layer(s): " in line and "0 left alone" in line
    [rec] = [r for r in read_records(out["on"]) if r["kind"] == "graph"]
    assert rec["source"] == "mla-passes dump"
    assert "no MLA layer seen: no graph was recorded" in summary_line(out["off"])


ENV_SCRIPT = textwrap.dedent('''
    import os
    for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "MLA_PASSES_EXPLAIN_DIR"):
        print(k, "=", os.environ.get(k))
''')


@pytest.mark.parametrize("user_value", [None, "1"])
def test_dump_environment_for_vllm(tmp_path, capsys, monkeypatch, user_value):
    """dump exports the record folder and keeps vLLM's engine in process, unless the user set that; restores both."""
    monkeypatch.delenv("MLA_PASSES_EXPLAIN_DIR", raising=False)
    if user_value is None:
        monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    else:
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", user_value)
    script = tmp_path / "env.py"
    script.write_text(ENV_SCRIPT)
    out_dir = tmp_path / "d"
    assert cli.main(["dump", "--out", str(out_dir), "--passes", "off", "--", str(script)]) == 0
    out = capsys.readouterr().out
    assert f"VLLM_ENABLE_V1_MULTIPROCESSING = {user_value or '0'}" in out
    assert f"MLA_PASSES_EXPLAIN_DIR = {out_dir.resolve()}" in out
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == user_value
    assert "MLA_PASSES_EXPLAIN_DIR" not in os.environ


def test_dump_manager_steps_aside_for_vllm():
    """On a graph with vLLM ops the dump's own manager does not run: vLLM's pass_config (the plugin) decides."""
    import torch
    import torch.fx

    from mla_passes.diagnostics.dump import make_pass

    p = make_pass("on", max_num_seqs=8)
    calls = []
    p.manager = lambda graph: calls.append(graph)
    plain = torch.fx.Graph()
    x = plain.placeholder("x")
    plain.output(plain.call_function(torch.ops.aten.sin.default, (x,)))
    p(plain)
    assert calls == [plain]
    vllm_like = torch.fx.Graph()
    y = vllm_like.placeholder("y")
    vllm_like.output(vllm_like.call_function(_vllm_namespace_op(), (y,)))
    p(vllm_like)
    assert calls == [plain]


_LIBS = []


def _vllm_namespace_op():
    """An op in the ``vllm`` namespace (defined once per process)."""
    import torch

    if not _LIBS:
        _LIBS.append(torch.library.Library("vllm", "FRAGMENT"))
        _LIBS[0].define("mla_passes_dump_test_op(Tensor x) -> Tensor")
    return torch.ops.vllm.mla_passes_dump_test_op.default
