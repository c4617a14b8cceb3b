"""Bad input to the tools and the gate (issue 20, items 5-6): a malformed record
is skipped with one warning naming its line, a bad option value is a usage
error (exit 2), an empty or negative compile range is refused by name; no
traceback."""

from __future__ import annotations

import json

import pytest

from mla_passes.diagnostics import report
from mla_passes.gating import TokenRange, compile_range
from mla_passes import cli

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
    with caplog.at_level("WARNING", logger="mla_passes.diagnostics.report"):
        recs = report.read_records(d)
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


# --- every option of every command (issue 26, item 5) -------------------------------------------------
#
# One row per bad value: (command, option the error must name, argv after the command). Placeholders:
# {file} an existing file, {dir} an empty folder, {full} a folder holding a file, {missing} a path that does
# not exist, {script} a script that must never run, {json_list} a JSON file holding a list. Each row is a
# usage error: exit 2, one message naming the option, no traceback, nothing run.
CPU_CHECK = ["--check-only", "--device", "cpu"]
BAD_OPTIONS = [
    # demo
    ("demo", "--layers", ["--layers", "0"]),
    ("demo", "--layers", ["--layers", "-1"]),
    ("demo", "--layers", ["--layers", "two"]),
    ("demo", "--layers", ["--layers", "62"]),
    ("demo", "--heads", ["--heads", "-1"]),
    ("demo", "--heads", ["--heads", "0"]),
    ("demo", "--heads", ["--heads", "129"]),
    ("demo", "--tokens", ["--tokens", "100000"]),
    ("demo", "--tokens", ["--tokens", "0"]),
    ("demo", "--seed", ["--seed", "-1"]),
    ("demo", "--seed", ["--seed", "1.5"]),
    ("demo", "--seed", ["--seed", str(2**32)]),
    ("demo", "--out", ["--out", "{file}"]),
    ("demo", "--out", ["--out", "{file}/sub"]),
    ("demo", "--out", ["--out", ""]),
    ("demo", "--out", ["--out", "{dir}", "--no-dump"]),
    ("demo", "--backend", ["--backend", "bogus"]),
    # dump
    ("dump", "--out", ["--out", "{file}", "--", "{script}"]),
    ("dump", "--out", ["--out", "{file}/sub", "--", "{script}"]),
    ("dump", "--out", ["--out", "", "--", "{script}"]),
    ("dump", "--out", ["--out", "{full}", "--", "{script}"]),
    ("dump", "--passes", ["--out", "{dir}", "--passes", "maybe", "--", "{script}"]),
    ("dump", "--max-num-seqs", ["--out", "{dir}", "--max-num-seqs", "0", "--", "{script}"]),
    ("dump", "--backend", ["--out", "{dir}", "--backend", "cuda", "--", "{script}"]),
    ("dump", "SCRIPT", ["--out", "{dir}", "--", "{missing}/script.py"]),
    # diff
    ("diff", "A", ["{missing}", "{dir}"]),
    ("diff", "B", ["{dir}", "{missing}"]),
    ("diff", "--stage", ["{dir}", "{dir}", "--stage", "NO_SUCH_STAGE"]),
    ("diff", "--context", ["{dir}", "{dir}", "-U", "-5"]),
    ("diff", "--context", ["{dir}", "{dir}", "--context", "many"]),
    # report
    ("report", "DIR", ["{missing}"]),
    ("report", "DIR", ["{file}"]),
    # patterns
    ("patterns", "NAME", ["no_such_pattern_anywhere"]),
    # lint
    ("lint", "DUMP_OR_GRAPH", ["{missing}"]),
    ("lint", "DUMP_OR_GRAPH", ["{dir}"]),
    ("lint", "--stage", ["{dir}", "--stage", "NO_SUCH_STAGE"]),
    # bench: values alone, then the rules between options (all under --check-only --device cpu unless the
    # row is about those)
    ("bench", "--heads", [*CPU_CHECK, "--heads", "0"]),
    ("bench", "--heads", [*CPU_CHECK, "--heads", "16", "-3"]),
    ("bench", "--tokens", [*CPU_CHECK, "--tokens", "0"]),
    ("bench", "--variants", [*CPU_CHECK, "--variants", "bogus"]),
    ("bench", "--variants", [*CPU_CHECK, "--variants", "fused,bogus"]),
    ("bench", "--variants", [*CPU_CHECK, "--variants", ","]),
    ("bench", "--variants", [*CPU_CHECK, "--variants", "flashinfer"]),  # CUDA only: nothing would run
    ("bench", "--layers", [*CPU_CHECK, "--layers", "0"]),
    ("bench", "--reps", [*CPU_CHECK, "--reps", "0"]),
    ("bench", "--inner", [*CPU_CHECK, "--inner", "0"]),
    ("bench", "--dtype", [*CPU_CHECK, "--dtype", "float32"]),
    ("bench", "--block-size", [*CPU_CHECK, "--block-size", "0"]),
    ("bench", "--pad-every", [*CPU_CHECK, "--pad-every", "-1"]),
    ("bench", "--rope", [*CPU_CHECK, "--rope", "gptj,bogus"]),
    ("bench", "--cases", [*CPU_CHECK, "--cases", "fp4"]),
    ("bench", "--cases", [*CPU_CHECK, "--cases", "bf16"]),  # --check-only checks the fp8 case only
    ("bench", "--plot", [*CPU_CHECK, "--plot", "{missing}/plot.png"]),
    ("bench", "--plot", [*CPU_CHECK, "--plot", "{dir}"]),
    ("bench", "--plot", [*CPU_CHECK, "--plot", "{dir}/plot.png"]),  # --check-only times nothing to plot
    ("bench", "--sweep", [*CPU_CHECK, "--sweep"]),
    ("bench", "--device", ["--check-only", "--device", "bogus"]),
    ("bench", "--device", ["--check-only", "--device", "cuda:x"]),
    ("bench", "--device", ["--device", "cpu"]),  # timing needs CUDA
    ("bench", "--device", ["--check-only", "--device", "cuda:99"]),  # no such device here
    ("bench", "--json", [*CPU_CHECK, "--json", "{missing}/out.json"]),
    ("bench", "--json", [*CPU_CHECK, "--json", "{dir}"]),
    ("bench", "--json", [*CPU_CHECK, "--json", "{file}/out.json"]),
    # bench-step
    ("bench-step", "--heads", ["--smoke", "--heads", "0"]),
    ("bench-step", "--tokens", ["--smoke", "--tokens", "0"]),
    ("bench-step", "--context", ["--smoke", "--context", "0"]),
    ("bench-step", "--context", ["--smoke", "--context", "3"]),
    ("bench-step", "--layers", ["--smoke", "--layers", "0"]),
    ("bench-step", "--block-size", ["--smoke", "--block-size", "0"]),
    ("bench-step", "--reps", ["--smoke", "--reps", "0"]),
    ("bench-step", "--inner", ["--smoke", "--inner", "-2"]),
    ("bench-step", "--attn-q", ["--smoke", "--attn-q", "fp16"]),
    ("bench-step", "--pdl", ["--smoke", "--pdl"]),  # PDL is a CUDA launch attribute
    ("bench-step", "--predict-from", ["--predict-from", "{missing}/bench.json"]),
    ("bench-step", "--predict-from", ["--predict-from", "{script}"]),  # not JSON
    ("bench-step", "--predict-from", ["--predict-from", "{json_list}"]),
    ("bench-step", "--predict-from", ["--smoke", "--predict-from", "{json_object}"]),  # nothing to predict
    ("bench-step", "--device", ["--device", "bogus"]),
    ("bench-step", "--device", ["--smoke", "--device", "cuda:99"]),
    ("bench-step", "--json", ["--smoke", "--json", "{missing}/step.json"]),
    ("bench-step", "--plot", ["--smoke", "--plot", "{missing}/step.png"]),
    ("bench-step", "--plot", ["--smoke", "--plot", "{dir}/step.png"]),  # --smoke measures nothing to plot
]


def _option_keys(parser) -> dict[str, set[str]]:
    """command -> the options that take a value (their longest spelling) and the positionals (their metavar)."""
    import argparse

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    keys = {}
    for name, p in sub.choices.items():
        keys[name] = set()
        for a in p._actions:
            if a.nargs == 0 or a.nargs == argparse.REMAINDER:  # flags and SCRIPT's pass-through ARGS
                continue
            keys[name].add(max(a.option_strings, key=len) if a.option_strings else (a.metavar or a.dest))
    return keys


def test_bad_option_table_covers_every_option():
    """Every option that takes a value, of every command, has a bad-value row in BAD_OPTIONS."""
    keys = _option_keys(cli.build_parser())
    assert set(keys) == set(cli.SUBCOMMANDS)
    covered = {(c, o) for c, o, _ in BAD_OPTIONS}
    missing = sorted((c, o) for c, opts in keys.items() for o in opts if (c, o) not in covered)
    assert not missing, f"options without a bad-value row: {missing}"
    unknown = sorted((c, o) for c, o in covered if o not in keys[c] and not o.startswith("--"))
    assert not unknown, unknown


@pytest.fixture
def bad_paths(tmp_path):
    (tmp_path / "a_file.txt").write_text("not a folder\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.py").write_text("x = 1\n")
    ran = tmp_path / "ran"
    (tmp_path / "script.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    (tmp_path / "list.json").write_text("[1, 2]\n")
    (tmp_path / "object.json").write_text('{"tables": {}}\n')
    return dict(file=tmp_path / "a_file.txt", dir=tmp_path / "empty", full=tmp_path / "full",
                missing=tmp_path / "no_such_folder", script=tmp_path / "script.py", json_list=tmp_path / "list.json",
                json_object=tmp_path / "object.json"), ran


@pytest.mark.parametrize("command,option,argv", BAD_OPTIONS,
                         ids=[f"{c} {' '.join(a)}" for c, _, a in BAD_OPTIONS])
def test_bad_option_is_a_usage_error(command, option, argv, bad_paths, capsys, monkeypatch):
    """A bad option value ended in a traceback (exit 1), ran with a default in its place, or ran nothing and
    exited 0 (issue 26: demo --heads -1 / --layers 0, bench --device bogus / --variants bogus, bench-step
    --smoke --heads 0, dump --out FILE/sub, diff -U -5, ...): now exit 2 and a message naming the option."""
    paths, ran = bad_paths
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # bench --check-only --device cpu is otherwise refused
    words = [a.format(**paths) for a in argv]
    try:
        rc = cli.main([command, *words])
    except SystemExit as e:  # argparse's usage error
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out[-2000:], err[-2000:])
    assert "Traceback" not in out + err
    name = option if option.startswith("-") else f"argument {option}"
    assert name in err, err
    assert not ran.exists(), "the command ran"


def test_bench_on_cpu_without_the_interpreter_is_a_usage_error(monkeypatch, capsys):
    """`bench --check-only --device cpu` without TRITON_INTERPRET=1 died in Triton's driver lookup (traceback)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.main(["bench", *CPU_CHECK, "--heads", "1", "--tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "TRITON_INTERPRET=1" in err


def test_bench_step_smoke_keeps_the_sizes_given(monkeypatch):
    """`bench-step --smoke` dropped the --tokens/--context it was given (above 4 / 128) for its own, silently;
    it now takes what is given and only fills in what is not."""
    from mla_passes.bench import step as bench_step

    def parse(*words):
        args = cli.build_parser().parse_args(["bench-step", *words])
        assert bench_step._check_args(args) is None
        return args

    given = parse("--smoke", "--tokens", "8", "--context", "256", "--layers", "3")
    assert (given.tokens, given.context, given.layers, given.device) == ([8], [256], 3, "cpu")
    default = parse("--smoke")
    assert (default.tokens, default.context, default.layers) == (bench_step.SMOKE_DEFAULTS["tokens"],
                                                                bench_step.SMOKE_DEFAULTS["context"],
                                                                bench_step.SMOKE_DEFAULTS["layers"])
