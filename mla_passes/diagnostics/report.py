"""``mla-passes report DIR``: per MLA layer, was it fused, lifted or left alone, and why.

DIR is a folder the passes recorded into (see :mod:`mla_passes.records`):
an ``mla-passes dump`` folder, or vLLM's ``compilation_config.debug_dump_path``
(any depth: vLLM writes ``rank_<r>_dp_<d>/`` folders). For each graph the
pass manager was called on it prints the gating decision (compile range,
decode threshold, no-range policy, and the manager's reason), the MLA ops
the graph held, and per layer the outcome with every refusal the passes
recorded for it; then one line per layer over all graphs. When no layer was
seen at all it says the likely cause in plain words: the flag is off, the
graph was split at attention (vLLM's graph partition off), the graph lies
outside the decode range, the passes never ran (compile cache hit, eager
mode), or no layer was of the expected form (the vLLM does the RoPE, cache
write or q-prep in the model code, or through ops the passes do not know).

Exit status: 0 when some layer was fused or lifted, 1 when none was, 2 when
DIR holds no record at all or is not a folder.
"""

from __future__ import annotations

import collections
import json
import logging
import sys
from pathlib import Path

from ..records import RECORD_GLOB
from ..vllm import tables as vllm_tables

logger = logging.getLogger(__name__)

HELP = "per MLA layer: fused, lifted or left alone, each refusal's reason, and each graph's gating decision"


def add_arguments(parser) -> None:
    parser.add_argument("dir", metavar="DIR",
                        help="an `mla-passes dump` folder or vLLM's compilation_config.debug_dump_path")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


# --- reading records back ----------------------------------------------------------

def record_problem(rec) -> str | None:
    """Why ``rec`` (one decoded JSON line) is not a record the report can
    read, or None. Checks the fields the report reads, not every field
    (records may carry more)."""
    if not isinstance(rec, dict):
        return f"not a JSON object (a {type(rec).__name__})"
    kind = rec.get("kind")
    if not isinstance(kind, str):
        return "no 'kind' string"
    if kind != "graph":
        return None
    d = rec.get("decision")
    if not isinstance(d, dict):
        return "graph record without a 'decision' object"
    r = d.get("range")
    if r is not None and not (isinstance(r, list) and len(r) == 2):
        return "graph record whose decision 'range' is not [start, end]"
    for key in ("matched_counts", "pattern_counts", "ops_before", "forms_before", "pass_ms"):
        d = rec.get(key, {})
        if not (isinstance(d, dict)
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in d.values())):
            return f"graph record whose {key!r} is not an object of numbers"
    if not isinstance(rec.get("other_refusals", []), list):
        return "graph record whose 'other_refusals' is not a list"
    layers = rec.get("layers", [])
    if not isinstance(layers, list):
        return "graph record whose 'layers' is not a list"
    for lay in layers:
        if not (isinstance(lay, dict) and isinstance(lay.get("layer"), str) and isinstance(lay.get("outcome"), str)
                and isinstance(lay.get("reasons", []), list)):
            return "graph record with a layer entry that is not {layer, outcome, reasons}"
    return None


def read_records(folder, warn=None) -> list[dict]:
    """Every record under ``folder`` (any depth: vLLM writes per-rank folders),
    in file then line order. A line that is not a readable record (not JSON,
    not UTF-8, not an object, a graph record missing what the report reads:
    :func:`record_problem`) is skipped with one warning naming ``file:line``,
    passed to ``warn`` (default: this module's logger); an unreadable file
    likewise."""
    if warn is None:
        warn = logger.warning
    out = []
    for path in sorted(Path(folder).rglob(RECORD_GLOB)):
        try:
            lines = path.read_bytes().splitlines()
        except OSError as e:
            warn(f"skipped {path}: cannot read it ({e.strerror or e})")
            continue
        for i, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                warn(f"skipped {path}:{i}: not UTF-8")
                continue
            except ValueError:
                warn(f"skipped {path}:{i}: not JSON")
                continue
            problem = record_problem(rec)
            if problem is not None:
                warn(f"skipped {path}:{i}: {problem}")
                continue
            rec["_file"] = str(path)
            out.append(rec)
    return out


# vLLM's CPU wheel carries one kernel library per x86 instruction set and loads
# the one the CPU can run (``CpuPlatform.import_kernels``); the library's file
# name says which. Read from the process's own mappings, so it is what ran.
VLLM_CPU_KERNEL_BUILDS = {
    "_C": "AVX-512 with bf16",
    "_C_AVX512": "AVX-512",
    "_C_AVX2": "AVX2",
}


def describe_vllm_cpu_kernels(machine: dict) -> str | None:
    """``"_C_AVX2 (the AVX2 build), CPU: avx2"`` for a record's machine facts on vLLM's CPU platform, else None."""
    if not machine or machine.get("platform") != "cpu" or not machine.get("vllm_kernels"):
        return None
    libs = ", ".join(f"{k} (the {VLLM_CPU_KERNEL_BUILDS[k]} build)" if k in VLLM_CPU_KERNEL_BUILDS else k
                     for k in machine["vllm_kernels"])
    return f"{libs}; CPU has {' '.join(machine.get('cpu_features') or []) or 'none of avx2/avx512/amx'}"


# --- the analysis -------------------------------------------------------------------

def summarize(records: list[dict]) -> dict:
    """Per-layer outcomes over all graph records, and the likely cause when
    no layer was seen."""
    graphs = [r for r in records if r.get("kind") == "graph"]
    configs = [r for r in records if r.get("kind") == "vllm_config"]
    per_layer: dict[str, collections.Counter] = {}
    reasons: dict[str, list[str]] = {}
    for g in graphs:
        for lay in g.get("layers", []):
            outcome = lay["outcome"]
            if outcome == "left alone" and not g["decision"].get("ran"):
                why = f"gating: {g['decision'].get('why')}"
                lay = {**lay, "reasons": [why, *lay.get("reasons", [])]}
            per_layer.setdefault(lay["layer"], collections.Counter())[outcome] += 1
            rs = reasons.setdefault(lay["layer"], [])
            rs.extend(r for r in lay.get("reasons", []) if r not in rs)
    totals = collections.Counter()
    for counts in per_layer.values():
        totals[best_outcome(counts)] += 1
    return {
        "graphs": len(graphs),
        "configs": configs,
        "layers": {name: {"outcomes": dict(c), "best": best_outcome(c), "reasons": reasons.get(name, [])}
                   for name, c in per_layer.items()},
        "totals": dict(totals),
        "attention_backends": sorted({lay["attention_backend"] for g in graphs for lay in g.get("layers", [])
                                      if lay.get("attention_backend")}),
        "vllm_cpu_kernels": sorted({k for g in graphs
                                    if (k := describe_vllm_cpu_kernels(g.get("machine") or {}))}),
        "cause": None if totals.get("fused") or totals.get("lifted") else likely_cause(graphs, configs),
    }


def model_code_form(forms) -> str | None:
    """The plain-words cause when every MLA attention call the passes saw is
    of a form they do not rewrite because the model code already does the
    work (``mla_passes.records.attention_forms``); None otherwise."""
    n = forms.get("attention", 0)
    prepared, bare = forms.get("q_prepared_in_model", 0), forms.get("no_rope_or_cache_op", 0)
    if not n or prepared + bare < n:
        return None
    parts = []
    if prepared:
        parts.append(f"{prepared} take a decode q the model code already prepared (mqa_q_prepared: q-absorb and "
                     "concat, with the cache write before them, run outside the attention op)")
    if bare:
        parts.append(f"{bare} have no KV-cache update or fused-RoPE op of their own in the graph (the RoPE and "
                     "cache write run in the model code, or the layer reads another layer's KV cache)")
    return (f"no layer of the expected form found: of {n} MLA attention call(s), " + "; ".join(parts)
            + ". vLLM does this part of the decode step in the model code here (upstream is moving MLA fusions "
            "there, RFC #43224), so there is nothing left for the passes to fuse; vLLM's own path runs")


def best_outcome(counts) -> str:
    for o in ("fused", "lifted", "prepped q"):
        if counts.get(o):
            return o
    return "left alone"


def likely_cause(graphs: list[dict], configs: list[dict]) -> str:
    """Why no MLA layer was seen (or none rewritten), in plain words."""
    if configs and not any(c.get("flag") for c in configs):
        return ("the flag is off: pass_config.fuse_aiter_qk_rope_kvcache_mla is not set, so vLLM never "
                "installed the mla-passes pass manager (turn it on with compilation_config="
                "{\"pass_config\": {\"fuse_aiter_qk_rope_kvcache_mla\": True}})")
    split = any(c.get("mode") == "VLLM_COMPILE" and not c.get("use_inductor_graph_partition") for c in configs)
    if not graphs:
        on = [c for c in configs if c.get("flag")]
        if on and all(c.get("enforce_eager") for c in on):
            return "the flag is on but vLLM runs eagerly (enforce_eager=True): nothing is compiled, no pass runs"
        if on:
            return ("the flag is on but the pass manager never ran on a graph: most likely vLLM loaded the "
                    "compiled model from its compile cache (no post-grad pass runs then; set "
                    "VLLM_DISABLE_COMPILE_CACHE=1 or a fresh VLLM_CACHE_ROOT), or compilation is off "
                    "(mode NONE)")
        return ("no graph was recorded: the mla-passes pass manager never ran with a record folder "
                "(not an `mla-passes dump` folder or vLLM debug_dump_path? flag off? compile cache hit?)")
    ran = [g for g in graphs if g["decision"].get("ran")]
    if not ran:
        whys = sorted({str(g["decision"].get("why")) for g in graphs})
        return ("every graph was outside the decode range, so the passes did not run on it: "
                + "; ".join(whys))
    seen = collections.Counter()
    forms = collections.Counter()
    for g in ran:
        seen.update({k: v for k, v in g.get("ops_before", {}).items() if v})
        forms.update(g.get("forms_before", {}))
    # A split graph also holds attentions without their cache update: that cause first.
    unexpected = None if split else model_code_form(forms)
    if unexpected:
        return unexpected
    if seen and not seen.get("attention"):
        return ("the graph was split at attention: the passes saw cache updates/RoPE but no MLA attention "
                "call in the same graph (vLLM splits at attention unless "
                "compilation_config.use_inductor_graph_partition=True)")
    if not seen:
        if split:
            return ("the graph was split at attention (vLLM VLLM_COMPILE with graph partition off): the "
                    "pieces the passes saw hold no MLA attention or cache update; set "
                    "compilation_config.use_inductor_graph_partition=True")
        if any(c.get("use_mla") for c in configs):
            version = sorted({str(c.get("vllm_version")) for c in configs if c.get("vllm_version")})
            return ("no layer of the expected form found: vLLM runs this model as MLA (model_config.use_mla)"
                    f"{' (vLLM ' + ', '.join(version) + ')' if version else ''}, but no graph the passes ran on "
                    f"holds {', '.join(_known_vllm_ops())}: this vLLM runs its MLA attention, RoPE and "
                    "cache write through other ops or in the model code, which the passes do not know; "
                    "nothing was fused")
        return "the graphs the passes ran on hold no MLA attention, cache update or fused-RoPE op (not an MLA model?)"
    if seen.get("attention"):
        return "the passes ran on the layers and refused each one: the reasons are listed per layer above"
    return "MLA ops were seen but no layer could be paired (see the refusals above)"


# --- printing ------------------------------------------------------------------------

def _range(d: dict) -> str:
    r = d.get("range")
    return "none" if r is None else f"({r[0]}, {r[1]})"


_CONFIG_MACHINE = (("block_size", "block size"), ("max_num_batched_tokens", "max_num_batched_tokens"),
                   ("attention_backend_asked", "attention backend asked"))
_CONFIG_SHOWN = ("flag", "mode", "use_inductor_graph_partition", "max_num_seqs", "threshold_override",
                 *(k for k, _ in _CONFIG_MACHINE))


def _distinct_configs(configs: list[dict]) -> list[tuple[dict, list]]:
    """vLLM builds its config in each process (main, engine core): one line
    per distinct config, as far as the line shows it."""
    seen: dict[str, tuple[dict, list]] = {}
    for c in configs:
        key = json.dumps([c.get(k) for k in _CONFIG_SHOWN], default=str)
        seen.setdefault(key, (c, []))[1].append(c.get("pid"))
    return list(seen.values())


def format_report(folder: str, records: list[dict], summary: dict) -> str:
    out = [f"mla-passes report: {folder}\n"]
    for c, pids in _distinct_configs(summary["configs"]):
        out.append(
            f"vLLM config (pid {', '.join(map(str, pids))}): flag {'on' if c.get('flag') else 'off'}, "
            f"mode {c.get('mode')}, graph partition {'on' if c.get('use_inductor_graph_partition') else 'off'}, "
            f"max_num_seqs {c.get('max_num_seqs')}, threshold override {c.get('threshold_override')}"
            + "".join(f", {label} {c[k]}" for k, label in _CONFIG_MACHINE if c.get(k) is not None) + "\n")
    for g in (r for r in records if r.get("kind") == "graph"):
        d = g["decision"]
        files = " ".join(f"{k.split('_')[0]}: {g[k]}" for k in ("before_file", "after_file") if g.get(k))
        out.append(f"graph {g.get('graph')} (pid {g.get('pid')}, {g.get('source')}){' ' + files if files else ''}\n")
        out.append(f"  gating: {'passes ran' if d.get('ran') else 'left alone'}: {d.get('why')}\n")
        out.append(f"          range {_range(d)}, threshold {d.get('threshold')}, policy {d.get('policy')}\n")
        ops = ", ".join(f"{k} {v}" for k, v in g.get("ops_before", {}).items())
        out.append(f"  MLA ops before: {ops}\n")
        if d.get("ran"):
            matched = ", ".join(f"{k}={v}" for k, v in g.get("matched_counts", {}).items()) or "none"
            out.append(f"  matched: {matched}\n")
            if g.get("pattern_counts"):
                pats = ", ".join(f"{k} {v}" for k, v in g["pattern_counts"].items())
                out.append(f"  registered patterns matched: {pats}\n")
            if g.get("pass_ms"):
                out.append("  pass time: " + ", ".join(f"{k} {v:.1f} ms" for k, v in g["pass_ms"].items()) + "\n")
        backends = sorted({lay["attention_backend"] for lay in g.get("layers", []) if lay.get("attention_backend")})
        if backends:
            out.append(f"  attention backend: {', '.join(backends)}\n")
        kernels = describe_vllm_cpu_kernels(g.get("machine") or {})
        if kernels:
            out.append(f"  vLLM CPU kernels: {kernels}\n")
        for lay in g.get("layers", []):
            out.append(f"  layer {lay['layer']}: {lay['outcome']}\n")
            for r in lay.get("reasons", []):
                out.append(f"      refused by {r}\n")
        for r in g.get("other_refusals", []):
            out.append(f"  refused (no layer): {r}\n")
    layers = summary["layers"]
    if layers:
        out.append("per layer, over all graphs:\n")
        w = max(len(n) for n in layers)
        for name, info in layers.items():
            seen = ", ".join(f"{o} in {n}" for o, n in info["outcomes"].items())
            out.append(f"  {name:<{w}}  {info['best']:<10}  ({seen} graph(s))\n")
            if info["best"] == "left alone":
                for r in info["reasons"]:
                    out.append(f"  {'':<{w}}    {r}\n")
        t = summary["totals"]
        out.append(f"-- {len(layers)} layer(s): {t.get('fused', 0)} fused, {t.get('lifted', 0)} lifted, "
                   f"{t.get('left alone', 0)} left alone\n")
        if summary.get("attention_backends"):
            names = summary["attention_backends"]
            cpu_note = "; on CPU AMX_MLA needs AMX tiles" if {"AMX_MLA", "CPU_MLA"} & set(names) else ""
            out.append(f"-- attention backend: {', '.join(names)} (vLLM's choice for this machine{cpu_note})\n")
        for kernels in summary.get("vllm_cpu_kernels", []):
            out.append(f"-- vLLM CPU kernels: {kernels} (vLLM loads the build this CPU can run)\n")
        if summary["cause"]:
            out.append(f"-- nothing fused or lifted: {summary['cause']}\n")
    else:
        out.append(f"-- no MLA layer seen: {summary['cause']}\n")
    return "".join(out)


def run(args) -> int:
    folder = Path(args.dir)
    if not folder.is_dir():
        print(f"mla-passes report: argument DIR: {folder} is not a folder", file=sys.stderr)
        return 2
    records = read_records(folder, warn=lambda msg: print(f"mla-passes report: {msg}", file=sys.stderr))
    summary = summarize(records)
    if args.json:
        print(json.dumps({"dir": str(folder), "summary": summary,
                          "graphs": [r for r in records if r.get("kind") == "graph"]}, indent=2, default=str))
    else:
        sys.stdout.write(format_report(str(folder), records, summary))
    if not records:
        return 2
    t = summary["totals"]
    return 0 if t.get("fused") or t.get("lifted") else 1


def _known_vllm_ops() -> list[str]:
    """``vllm::name`` of every MLA op the passes know, across the supported releases."""
    return [q for role in ("attention", "kv_cache_update", "fused_rope") for q in vllm_tables.qualified_names(role)]
