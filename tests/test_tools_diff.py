"""``mla-passes diff`` on hand-made dump folders: pairing across depyf's
naming schemes, normalization, op counts with ``auto_functionalized``
unwrapped, one-sided graphs, JSON. (Real passes-off/on dumps: test_tools_demo.)"""

from __future__ import annotations

import json
import re

from mla_passes import cli
from mla_passes.diagnostics.diff import compare_paths
from mla_passes.diagnostics.graph_files import (
    GraphKey,
    collect_graph_files,
    normalize_graph_source,
    parse_graph_source,
)

HEADER = "from __future__ import annotations\nimport torch\nfrom torch import device\n"

BEFORE = HEADER + '''class GraphModule(torch.nn.Module):
    def forward(self, arg0_1: "bf16[4, 16, 192]", arg1_1: "bf16[4, 512]", arg2_1: "i64[4]"):
        # File: /somewhere/model.py:10 in forward, code: q = ...
        slice_3: "bf16[4, 16, 64]" = torch.ops.aten.slice.Tensor(arg0_1, 2, 128, 192)
        mul_7: "bf16[4, 16, 64]" = torch.ops.aten.mul.Tensor(slice_3, 2);  slice_3 = None
        slice_scatter_2: "bf16[4, 16, 192]" = torch.ops.aten.slice_scatter.default(arg0_1, mul_7, 2, 128, 192);  arg0_1 = mul_7 = None
        empty: "bf16[4, 2048]" = torch.ops.aten.empty.memory_format([4, 2048], dtype = torch.bfloat16)
        auto_functionalized_1 = torch.ops.higher_order.auto_functionalized(torch.ops.vllm.unified_mla_attention_with_output.default, q = slice_scatter_2, kv_c_normed = arg1_1, output = empty);  slice_scatter_2 = arg1_1 = empty = None
        getitem_5: "bf16[4, 2048]" = auto_functionalized_1[1];  auto_functionalized_1 = None
        return (getitem_5,)
'''

# Same graph, other node numbers / comments / tails: normalizes to BEFORE.
BEFORE_RENUMBERED = HEADER + '''class GraphModule(torch.nn.Module):
    def forward(self, arg0_1: "bf16[4, 16, 192]", arg1_1: "bf16[4, 512]", arg2_1: "i64[4]"):
        # File: /elsewhere/other.py:99 in forward, code: different
        slice_1: "bf16[4, 16, 64]" = torch.ops.aten.slice.Tensor(arg0_1, 2, 128, 192)
        mul: "bf16[4, 16, 64]" = torch.ops.aten.mul.Tensor(slice_1, 2)
        slice_scatter: "bf16[4, 16, 192]" = torch.ops.aten.slice_scatter.default(arg0_1, mul, 2, 128, 192)

        empty: "bf16[4, 2048]" = torch.ops.aten.empty.memory_format([4, 2048], dtype = torch.bfloat16)
        auto_functionalized = torch.ops.higher_order.auto_functionalized(torch.ops.vllm.unified_mla_attention_with_output.default, q = slice_scatter, kv_c_normed = arg1_1, output = empty);  slice_scatter = None
        getitem: "bf16[4, 2048]" = auto_functionalized[1]
        return (getitem,)
'''

AFTER = HEADER + '''class GraphModule(torch.nn.Module):
    def forward(self, arg0_1: "bf16[4, 16, 192]", arg1_1: "bf16[4, 512]", arg2_1: "i64[4]"):
        mla_fused_decode_prep: "f8e4m3fn[4, 16, 576]" = torch.ops.mla_passes.mla_fused_decode_prep.default(arg0_1, arg1_1, arg2_1)
        empty: "bf16[4, 2048]" = torch.ops.aten.empty.memory_format([4, 2048], dtype = torch.bfloat16)
        mla_attention_with_prepped_q = torch.ops.mla_passes.mla_attention_with_prepped_q.default(arg0_1, mla_fused_decode_prep, arg1_1, empty);  arg0_1 = mla_fused_decode_prep = arg1_1 = None
        return (empty,)
'''

UUID_A = "7a1dca9b_ec4b_4896_9365_ca049f095b7f"
UUID_B = "5ea725b4_05b3_438a_9ff8_e3888cd5880b"


def _write(folder, files: dict[str, str]):
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def _dumps(tmp_path):
    """A: compiled fn 2 (first process); B: compiled fn 7 (same script later in
    the process), different uuids, our passes' graphs only in B."""
    a = _write(tmp_path / "a", {
        "__compiled_fn_2.AFTER_POST_GRAD.0.py": BEFORE,
        f"__compiled_fn_2.__compiled_fn_2_{UUID_A}.0.py": BEFORE,
        "__compiled_fn_2.Forward_graph.0.py": BEFORE,
        "__compiled_fn_2.kernel_0.py": "# inductor output code, not a graph\n",
        "full_code_for_forward_0.py": "def forward(): pass\n",
        "__compiled_fn_2.only_in_a.0.py": BEFORE,
    })
    b = _write(tmp_path / "b", {
        "__compiled_fn_7.AFTER_POST_GRAD.0.py": AFTER,
        f"__compiled_fn_7.__compiled_fn_7_{UUID_B}.0.py": BEFORE_RENUMBERED,
        "__compiled_fn_7.Forward_graph.0.py": BEFORE_RENUMBERED,
        "__compiled_fn_7.kernel_0.py": "# other output code\n",
        "__compiled_fn_7.mla_passes_before_qk_rope_kv_cache_fusion.0.py": BEFORE_RENUMBERED,
        "__compiled_fn_7.mla_passes_after_qk_rope_kv_cache_fusion.0.py": AFTER,
    })
    return a, b


def test_op_counts_unwrap_auto_functionalized():
    counts = parse_graph_source(BEFORE).op_counts()
    assert counts == {
        "aten.slice.Tensor": 1, "aten.mul.Tensor": 1, "aten.slice_scatter.default": 1,
        "aten.empty.memory_format": 1, "vllm.unified_mla_attention_with_output.default": 1,
    }


def test_normalization_removes_numbering_comments_and_none_tails():
    assert normalize_graph_source(BEFORE) == normalize_graph_source(BEFORE_RENUMBERED)
    norm = normalize_graph_source(BEFORE)
    assert "# File" not in norm and "= None" not in norm
    assert "slice_scatter = torch.ops" not in norm  # LHS names keep annotations
    assert 'slice_scatter: "bf16[4, 16, 192]" = torch.ops.aten.slice_scatter.default(arg0, mul, 2, 128, 192)' in norm
    # kwarg names are not renamed even when a node has the same name
    assert "q = slice_scatter, kv_c_normed = arg1, output = empty" in norm


def test_pairing_keys_across_naming_schemes(tmp_path):
    a, b = _dumps(tmp_path)
    ka, kb = collect_graph_files(a), collect_graph_files(b)
    assert set(ka) == {GraphKey(0, "AFTER_POST_GRAD", 0), GraphKey(0, "Captured_Graph", 0),
                       GraphKey(0, "Forward_graph", 0), GraphKey(0, "only_in_a", 0)}
    assert set(kb) == {GraphKey(0, "AFTER_POST_GRAD", 0), GraphKey(0, "Captured_Graph", 0),
                       GraphKey(0, "Forward_graph", 0),
                       GraphKey(0, "mla_passes_before_qk_rope_kv_cache_fusion", 0),
                       GraphKey(0, "mla_passes_after_qk_rope_kv_cache_fusion", 0)}
    # older depyf: spaces, "Captured Graph"
    old = _write(tmp_path / "old", {"__compiled_fn_11 Captured Graph 0.py": BEFORE,
                                    "__compiled_fn_11 Forward graph 0.py": BEFORE,
                                    "__compiled_fn_11 kernel 0.py": "x = 1\n"})
    assert set(collect_graph_files(old)) == {GraphKey(0, "Captured_Graph", 0), GraphKey(0, "Forward_graph", 0)}


def test_compare_dump_folders(tmp_path):
    a, b = _dumps(tmp_path)
    pairs = {p.key: p for p in compare_paths(a, b)}
    assert {k: p.status for k, p in pairs.items()} == {
        "fn0.AFTER_POST_GRAD.0": "changed",
        "fn0.Captured_Graph.0": "identical",
        "fn0.Forward_graph.0": "identical",
        "fn0.only_in_a.0": "only_a",
        "fn0.mla_passes_before_qk_rope_kv_cache_fusion.0": "only_b",
        "fn0.mla_passes_after_qk_rope_kv_cache_fusion.0": "only_b",
    }
    post = pairs["fn0.AFTER_POST_GRAD.0"]
    assert post.changed_ops() == {
        "mla_passes.mla_fused_decode_prep.default": 1,
        "mla_passes.mla_attention_with_prepped_q.default": 1,
        "vllm.unified_mla_attention_with_output.default": -1,
        "aten.slice.Tensor": -1, "aten.mul.Tensor": -1, "aten.slice_scatter.default": -1,
    }
    assert post.op_counts["aten.empty.memory_format"] == (1, 1)
    assert "+        mla_fused_decode_prep" in post.diff
    assert "-        slice_scatter" in post.diff


def test_cli_text_and_json(tmp_path, capsys):
    a, b = _dumps(tmp_path)
    assert cli.main(["diff", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "== fn0.AFTER_POST_GRAD.0: changed" in out
    assert re.search(r"mla_passes\.mla_fused_decode_prep\.default +0 +1 +\+1\n", out)
    assert re.search(r"vllm\.unified_mla_attention_with_output\.default +1 +0 +-1\n", out)
    assert "== fn0.only_in_a.0: only in A" in out
    assert "== fn0.mla_passes_after_qk_rope_kv_cache_fusion.0: only in B" in out
    assert "-- 6 graphs: 1 changed, 2 identical, 1 only in A, 2 only in B" in out

    assert cli.main(["diff", "--json", "--stage", "AFTER_POST_GRAD", str(a), str(b)]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["summary"] == {"changed": 1, "identical": 0, "only_a": 0, "only_b": 0}
    ops = data["graphs"][0]["op_counts"]
    assert ops["mla_passes.mla_fused_decode_prep.default"] == {"a": 0, "b": 1, "delta": 1}


def test_cli_two_files_and_errors(tmp_path, capsys):
    fa, fb = tmp_path / "x.py", tmp_path / "y.py"
    fa.write_text(BEFORE)
    fb.write_text(BEFORE_RENUMBERED)
    assert cli.main(["diff", str(fa), str(fb)]) == 0
    assert "1 identical" in capsys.readouterr().out
    fb.write_text(AFTER)
    assert cli.main(["diff", "--no-text", str(fa), str(fb)]) == 1
    out = capsys.readouterr().out
    assert "aten.slice_scatter.default" in out and "@@" not in out
    assert cli.main(["diff", str(fa), str(tmp_path)]) == 2


def test_pairs_the_graphs_written_into_vllm_debug_dump_path(tmp_path):
    """Our CPU debug_dump_path files (mla_passes_graph.<pid>.<n>.<side>.py) pair across runs despite other pids."""
    a = _write(tmp_path / "a", {"mla_passes_graph.17564.1.before.py": BEFORE,
                                "mla_passes_graph.17564.1.after.py": AFTER})
    b = _write(tmp_path / "b", {"mla_passes_graph.9572.1.before.py": BEFORE_RENUMBERED,
                                "mla_passes_graph.9572.1.after.py": BEFORE})
    assert set(collect_graph_files(a)) == {GraphKey(0, "mla_passes_before", 0), GraphKey(0, "mla_passes_after", 0)}
    pairs = {p.key: p.status for p in compare_paths(a, b)}
    assert pairs == {"fn0.mla_passes_before.0": "identical", "fn0.mla_passes_after.0": "changed"}
