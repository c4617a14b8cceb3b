"""``mla-passes dump`` runs a user script under depyf with the passes off/on;
``mla-passes diff`` on the two real dumps shows the rewrite."""

from __future__ import annotations

import re
import textwrap

import pytest

from mla_passes.tools import cli
from mla_passes.tools.graphdiff import collect_graph_files, compare_paths

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
