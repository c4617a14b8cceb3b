"""Bad input to the tools and the gate (issue 20, items 5-6): a malformed record
is skipped with one warning naming its line, a bad option value is a usage
error (exit 2), an empty or negative compile range is refused by name; no
traceback."""

from __future__ import annotations

import json

import pytest

from mla_passes import explain
from mla_passes.gating import TokenRange, compile_range
from mla_passes.tools import cli

LAYER = "model.layers.0.self_attn.attn"
GOOD = {"kind": "graph", "graph": 0, "pid": 1, "source": "test",
        "decision": {"ran": True, "why": "range (1, 8) within the decode threshold 256", "range": [1, 8],
                     "threshold": 256, "policy": "infer"},
        "matched_counts": {"mla_qk_rope_kvcache_fusion": 1}, "pattern_counts": {"rope_gptj_native": 2},
        "pass_ms": {"mla_qk_rope_kvcache_fusion": 1.5}, "ops_before": {"attention": 1, "kv_cache_update": 1},
        "layers": [{"layer": LAYER, "outcome": "fused", "reasons": []}], "other_refusals": []}

BAD_LINES = {
    "json_list": b"[1, 2, 3]",
    "json_string": b'"graph"',
    "no_decision": json.dumps({k: v for k, v in GOOD.items() if k != "decision"}).encode(),
    "decision_null": json.dumps({**GOOD, "decision": None}).encode(),
    "not_utf8": b'{"kind": "graph", "why": "\xff\xfe"}',
    "layers_string": json.dumps({**GOOD, "layers": "model.layers.0"}).encode(),
    "layer_entry_string": json.dumps({**GOOD, "layers": ["model.layers.0"]}).encode(),
    "layer_without_outcome": json.dumps({**GOOD, "layers": [{"layer": LAYER}]}).encode(),
    "counts_string": json.dumps({**GOOD, "matched_counts": {"mla_qk_rope_kvcache_fusion": "one"}}).encode(),
    "pass_ms_list": json.dumps({**GOOD, "pass_ms": [1.0]}).encode(),
    "range_int": json.dumps({**GOOD, "decision": {**GOOD["decision"], "range": 5}}).encode(),
    "no_kind": json.dumps({"decision": {}}).encode(),
    "not_json": b"{truncated",
}


def _folder(tmp_path, bad: list[bytes]):
    d = tmp_path / "dump"
    d.mkdir()
    f = d / "mla_passes_explain.123.jsonl"
    f.write_bytes(b"\n".join([json.dumps(GOOD).encode(), *bad]) + b"\n")
    return d, f


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_report_skips_a_malformed_record(tmp_path, capsys, name):
    """`mla-passes report` crashed with a traceback on a malformed record (a JSON list line, a graph record
    without `decision` or with `decision: null`, non-UTF-8 bytes, `layers` as a string)."""
    d, f = _folder(tmp_path, [BAD_LINES[name]])
    rc = cli.main(["report", str(d)])
    out, err = capsys.readouterr()
    assert rc == 0  # the good record still says the layer was fused
    assert f"{LAYER}  fused" in out
    warnings = [ln for ln in err.splitlines() if ln]
    assert len(warnings) == 1 and f"{f}:2" in warnings[0] and "skipped" in warnings[0], err


def test_report_all_malformed_records_at_once(tmp_path, capsys):
    """Every malformed line gets its own one-line warning; --json works on what is left."""
    d, f = _folder(tmp_path, list(BAD_LINES.values()))
    rc = cli.main(["report", "--json", str(d)])
    out, err = capsys.readouterr()
    assert rc == 0
    assert json.loads(out)["summary"]["totals"] == {"fused": 1}
    warned = [ln for ln in err.splitlines() if "skipped" in ln]
    assert [w.split(f"{f}:")[1].split(":")[0] for w in warned] == [str(i) for i in range(2, 2 + len(BAD_LINES))]


def test_read_records_warns_through_the_logger(tmp_path, caplog):
    """Outside the CLI a skipped line is a logged warning, and only the good record comes back."""
    d, f = _folder(tmp_path, [BAD_LINES["json_list"]])
    with caplog.at_level("WARNING", logger="mla_passes.explain"):
        recs = explain.read_records(d)
    assert [r["kind"] for r in recs] == ["graph"]
    assert any(f"{f}:2" in r.getMessage() for r in caplog.records)


def test_report_on_only_malformed_records_exits_2(tmp_path, capsys):
    """A folder whose every line is malformed holds no record: exit 2, as for an empty folder."""
    d = tmp_path / "dump"
    d.mkdir()
    (d / "mla_passes_explain.9.jsonl").write_bytes(BAD_LINES["json_list"] + b"\n")
    assert cli.main(["report", str(d)]) == 2
    assert "skipped" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_dump_bad_max_num_seqs_is_a_usage_error(tmp_path, capsys, value):
    """`mla-passes dump --max-num-seqs 0` (or -1) ended in a traceback, exit 1, not a usage error."""
    script = tmp_path / "s.py"
    script.write_text("print('ran')\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["dump", "--out", str(tmp_path / "out"), "--max-num-seqs", value, "--", str(script)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--max-num-seqs" in err and "positive integer" in err


def test_dump_bad_backend_is_a_usage_error(tmp_path, capsys):
    """An unknown --backend is a usage error too, before anything runs."""
    script = tmp_path / "s.py"
    script.write_text("print('ran')\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["dump", "--out", str(tmp_path / "out"), "--backend", "cuda", "--", str(script)])
    assert e.value.code == 2
    assert "ran" not in capsys.readouterr().out


@pytest.mark.parametrize("r,what", [(TokenRange(9, 4), "empty"), (TokenRange(0, -1), ">= 0"),
                                    (TokenRange(-3, 4), ">= 0"), (-1, ">= 0")])
def test_compile_range_rejects_empty_or_negative(r, what):
    """compile_range accepted start > end and a negative end, and the gate read them as inside the bucket."""
    with pytest.raises(ValueError, match="compile_range: argument 'r'") as e:
        with compile_range(r):
            pass
    assert what in str(e.value)


def test_compile_range_accepts_a_single_count_and_zero():
    """The bounds themselves stay legal: (0, 0), (n, n), (1, n)."""
    for r in (TokenRange(0, 0), TokenRange(4, 4), TokenRange(1, 256), 7):
        with compile_range(r) as got:
            assert got.start <= got.end
