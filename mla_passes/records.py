"""What the passes decided, written down per graph: the record behind
``mla-passes report`` (which reads it back: :mod:`mla_passes.diagnostics.report`).

"I turned the flag on: did it fuse, and if not, why not?" The pass manager
answers that at debug level in the log; this module writes the same answer
to a file, where dumps go, so a user can read it after a vLLM run whose
compile happened in another process.

For every graph the :class:`~mla_passes.MLAPassManager` is called on (the
``__call__`` is wrapped by :func:`recorded`), when a record folder is set,
one JSON line is appended to ``<folder>/mla_passes_explain.<pid>.jsonl``:

* the gating decision: the manager's ``last_decision`` text, the compile
  range in force, the decode threshold and the no-range policy, and whether
  the passes ran;
* per MLA layer found in the graph after the passes: ``fused`` (a
  prepped-q attention fed by ``mla_fused_decode_prep``), ``lifted`` (fed by
  ``mla_decode_q_prep``) or ``left alone`` (vLLM's attention op still
  there), with the refusals the passes recorded for that layer;
* the MLA ops the graph held before the passes (attention, cache update,
  fused RoPE), so that a graph holding half a layer (vLLM split the graph at
  attention) can be told apart from a graph with no layer at all.

The record folder is, first to last: the one :func:`attach` gave the
manager (the vLLM plugin attaches vLLM's ``compile_debug_dump_path()`` when
``compilation_config.debug_dump_path`` is set), else the environment variable
``MLA_PASSES_EXPLAIN_DIR`` (``mla-passes dump`` sets it; child processes
inherit it). With neither, nothing is computed or written. Where vLLM does
not run depyf itself (vLLM on CPU: ``DYNAMO_TRACE_ONCE``), an attached
manager also writes the graph before and after the passes
(``mla_passes_graph.<pid>.<n>.before.py`` / ``.after.py``), so the passes'
graphs land in ``debug_dump_path`` on every platform.

:func:`note_vllm_config` writes one ``vllm_config`` record per vLLM config
(flag on or off, compilation mode, graph partition, splitting ops, the
threshold): what ``mla-passes report`` needs to say in plain words why no
layer was seen. Writing a record never fails a compile: errors are logged
at debug level.
"""

from __future__ import annotations

import functools
import json
import logging
import operator
import os
import re
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_DIR = "MLA_PASSES_EXPLAIN_DIR"
RECORD_GLOB = "mla_passes_explain.*.jsonl"
_ATTR = "_mla_passes_explain"

FUSED, LIFTED, LEFT_ALONE = "fused", "lifted", "left alone"

_graph_counter = [0]


# --- where records go -----------------------------------------------------------

def attach(manager, directory, *, write_graphs: bool = False, source: str = "MLAPassManager",
           vllm_relative: bool = False) -> None:
    """Make ``manager`` record into ``directory`` (and write its before/after
    graphs there when ``write_graphs``). ``vllm_relative``: prefer the current
    vLLM config's ``compile_debug_dump_path()`` at record time (the worker's
    own rank folder) over ``directory``."""
    setattr(manager, _ATTR, {"dir": str(directory), "write_graphs": bool(write_graphs), "source": source,
                             "vllm_relative": bool(vllm_relative)})


def _current_vllm_dump_dir():
    mod = sys.modules.get("vllm.config.vllm")
    cfg = getattr(mod, "_current_vllm_config", None) if mod is not None else None
    if cfg is None or not hasattr(cfg, "compile_debug_dump_path"):
        return None
    return cfg.compile_debug_dump_path()


def sinks_of(manager) -> list[dict]:
    """Where ``manager`` records now: a list of ``{"dir", "write_graphs",
    "source"}``, the attached folder first, then ``$MLA_PASSES_EXPLAIN_DIR``
    when it is another folder; empty when neither is set."""
    out = []
    att = getattr(manager, _ATTR, None)
    if att is not None:
        sink = dict(att)
        if att.get("vllm_relative"):
            d = _current_vllm_dump_dir()
            if d is not None:
                sink["dir"] = str(d)
        out.append(sink)
    env = os.environ.get(ENV_DIR)
    if env and all(Path(env).resolve() != Path(s["dir"]).resolve() for s in out):
        out.append({"dir": env, "write_graphs": False,
                    "source": out[0]["source"] if out else "MLAPassManager"})
    return out


def append_record(directory, record: dict) -> Path:
    """Append ``record`` as one JSON line to this process's record file in ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"mla_passes_explain.{os.getpid()}.jsonl"
    record = {"pid": os.getpid(), "time": round(time.time(), 3), **record}
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    return path


# --- the wrapper around MLAPassManager.__call__ ------------------------------------

class _Unrun(list):
    """Put on each pass's ``refusals`` before the call: a pass that runs
    replaces it with its own list. A list, so that a pass that appends to or
    clears its list in place still works."""


def recorded(call):
    """Wrap ``MLAPassManager.__call__``: when a record folder is set, write
    what the call decided (see the module docstring). Costs one attribute
    lookup and one environment read per graph when none is set."""

    @functools.wraps(call)
    def wrapper(manager, graph, *args, **kwargs):
        try:
            sinks = sinks_of(manager)
            before = _before_state(manager, graph, sinks) if sinks else None
        except Exception:  # never fail a compile over a record
            logger.debug("mla-passes explain: could not read the graph before the passes", exc_info=True)
            sinks, before = [], None
        try:
            result = call(manager, graph, *args, **kwargs)
        finally:
            if before is not None:
                before["ran"] = _restore_refusals(manager)
        if sinks and before is not None:
            try:
                record = explain_graph(manager, graph, before)
                _write(sinks, record, before, graph)
            except Exception:
                logger.debug("mla-passes explain: could not write the record", exc_info=True)
        return result

    return wrapper


def _before_state(manager, graph, sinks) -> dict:
    for p in getattr(manager, "passes", []):
        p.refusals = _Unrun()  # a pass that runs replaces it with its own list
    state = {"ops": mla_op_counts(graph), "forms": attention_forms(graph)}
    if any(s.get("write_graphs") for s in sinks):
        state["text"] = _graph_text(graph)
    return state


def _restore_refusals(manager) -> dict[str, bool]:
    """Which passes ran (replaced the marker, or matched); a plain list back where the marker is."""
    ran = {}
    counts = getattr(manager, "matched_counts", None) or {}
    for p in getattr(manager, "passes", []):
        marked = isinstance(p.refusals, _Unrun)
        ran[p.name] = not marked or bool(p.refusals) or bool(counts.get(p.name))
        if marked:
            p.refusals = list(p.refusals)
    return ran


def _graph_text(graph) -> str | None:
    gm = graph.owning_module
    if gm is None:
        return None
    return gm.print_readable(print_output=False)


def _write(sinks: list[dict], record: dict, before: dict, graph) -> None:
    _graph_counter[0] += 1
    n = _graph_counter[0]
    record["graph"] = n
    after = _graph_text(graph) if record["decision"]["ran"] and before.get("text") is not None else None
    for sink in sinks:
        rec = {**record, "source": sink.get("source")}
        if sink.get("write_graphs") and before.get("text") is not None:
            d = Path(sink["dir"])
            d.mkdir(parents=True, exist_ok=True)
            stem = f"mla_passes_graph.{os.getpid()}.{n}"
            (d / f"{stem}.before.py").write_text(before["text"])
            rec["before_file"] = f"{stem}.before.py"
            if after is not None:
                (d / f"{stem}.after.py").write_text(after)
                rec["after_file"] = f"{stem}.after.py"
        append_record(sink["dir"], rec)


# --- reading the graph ----------------------------------------------------------------

def mla_op_counts(graph) -> dict[str, int]:
    """How many MLA attention / cache-update / fused-rope calls ``graph`` holds."""
    from .op_handles import op_handles
    from . import fx as _fx

    h = op_handles()
    return {role: len(_fx.find_op_calls(graph, getattr(h, role)))
            for role in ("attention", "kv_cache_update", "fused_rope")}


def attention_forms(graph, handles=None) -> dict[str, int]:
    """How the MLA attention calls of ``graph`` (before the passes) compare
    with the forms the passes expect (DESIGN §3): ``attention`` calls in all,
    ``q_prepared_in_model`` that take a decode q the model code already
    prepared (vLLM 0.34's ``mqa_q_prepared``: q-absorb/concat, and the cache
    write before it, done outside the op), ``no_rope_or_cache_op`` with no
    KV-cache update or fused-RoPE call of the same layer in the graph (the
    RoPE and cache write happen elsewhere: in model code, or the layer shares
    another layer's cache). A later vLLM that moves the MLA fusion into model
    code shows up here rather than as "0 fused"."""
    from .op_handles import op_handles
    from . import fx as _fx

    h = handles or op_handles()
    writers = {id(c.arg("layer_name")) for role in (h.kv_cache_update, h.fused_rope)
               for c in _fx.find_op_calls(graph, role)}
    out = {"attention": 0, "q_prepared_in_model": 0, "no_rope_or_cache_op": 0}
    for c in _fx.find_op_calls(graph, h.attention):
        out["attention"] += 1
        try:
            prepared = c.arg("mqa_q_prepared") is not None
        except KeyError:  # a schema without it (vLLM 0.32/0.33)
            prepared = False
        if prepared:
            out["q_prepared_in_model"] += 1
        elif id(c.arg("layer_name")) not in writers:
            out["no_rope_or_cache_op"] += 1
    return out


def _layer_str(ln) -> str:
    from .passes.attention import describe_layer

    return describe_layer(ln)


def _producer(node):
    while getattr(node, "op", None) == "call_function" and node.target is operator.getitem:
        node = node.args[0]
    return node


def layers_after(graph) -> dict[str, str]:
    """layer name -> fused / lifted / left alone, read from the graph after the passes."""
    from .op_handles import op_handles
    from . import fx as _fx
    from .passes.attention import ATTN_PREPPED
    from .passes.fusion_rewrite import FUSED as FUSED_OP
    from .passes.lift import Q_PREP

    out: dict[str, str] = {}
    for n in graph.find_nodes(op="call_function", target=ATTN_PREPPED, sort=True):
        qp = n.args[1] if len(n.args) > 1 else n.kwargs.get("q_prepped")
        ln = n.args[5] if len(n.args) > 5 else n.kwargs.get("layer_name")
        src = _producer(qp)
        target = getattr(src, "target", None)
        out[_layer_str(ln)] = FUSED if target is FUSED_OP else LIFTED if target is Q_PREP else "prepped q"
    for c in _fx.find_op_calls(graph, op_handles().attention):
        out.setdefault(_layer_str(c.arg("layer_name")), LEFT_ALONE)
    return out


def _refusal_layer(where: str, layers) -> str | None:
    for name in layers:
        if where == f"layer {name}" or where.endswith(f"({name})") or \
                re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", where):
            return name
    return None


def _where_why(refusal) -> tuple[str, str]:
    """(where, why) of one recorded refusal: a ``"where: why"`` string, or
    an object with ``where`` and ``why`` (or ``reason``)."""
    where = getattr(refusal, "where", None)
    why = getattr(refusal, "why", None) or getattr(refusal, "reason", None)
    if where is not None and why is not None:
        return str(where), str(why)
    where, _, why = str(refusal).partition(": ")
    return where, why


def _attention_backend(name: str) -> str | None:
    """The attention backend the layer's resolver names (None where unknown)."""
    from .layers import resolve_layer

    try:
        return resolve_layer(name).attention_backend
    except Exception:
        return None


_CPU_FEATURES = (("avx2", "_is_avx2_supported"), ("avx512", "_is_avx512_supported"),
                 ("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_tile", "_is_amx_tile_supported"))


def cpu_features() -> list[str]:
    """The x86 features that decide vLLM's CPU choices, as torch reports them for this CPU."""
    import torch

    return [name for name, fn in _CPU_FEATURES if getattr(torch.cpu, fn, lambda: False)()]


def vllm_kernel_libraries() -> list[str]:
    """Stems of the vLLM kernel libraries (``vllm/_C*.so``) mapped into this process, e.g. ``["_C_AVX2"]``."""
    found: list[str] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").rpartition(" ")[2]
                m = re.search(r"/vllm/(_C\w*?)(?:\.abi3)?\.so$", path)
                if m and m.group(1) not in found:
                    found.append(m.group(1))
    except OSError:  # no procfs (not Linux)
        pass
    return found


def machine_facts() -> dict:
    """What the machine made vLLM choose, for the record: the platform vLLM
    resolved (where it is loaded), the CPU's features and the vLLM kernel
    libraries this process loaded."""
    platform = None
    plat_mod = sys.modules.get("vllm.platforms")
    if plat_mod is not None:
        try:
            platform = str(plat_mod.current_platform.device_type)
        except Exception:
            platform = None
    return {"platform": platform, "cpu_features": cpu_features(), "vllm_kernels": vllm_kernel_libraries()}


def explain_graph(manager, graph, before: dict) -> dict:
    """The record of one call of ``manager`` on ``graph`` (after the call)."""
    from .gating import current_compile_range

    passes = list(getattr(manager, "passes", []))
    ran_by_pass = before.get("ran", {})
    ran = any(ran_by_pass.values())
    refusals: list[tuple[str, str, str]] = []  # (pass, where, why)
    for p in passes:
        if not ran_by_pass.get(p.name):
            continue
        for r in p.refusals:
            refusals.append((p.name, *_where_why(r)))
    r = current_compile_range()
    config = getattr(manager, "config", None)
    decision = {
        "ran": ran,
        "why": getattr(manager, "last_decision", None),
        "range": None if r is None else [r.start, r.end],
        "threshold": getattr(manager, "decode_max_tokens", None),
        "policy": getattr(config, "no_range_policy", None),
        "passes": [p.name for p in passes],
    }
    outcome = layers_after(graph)
    layers = []
    claimed = set()
    for name, what in outcome.items():
        reasons = []
        for i, (pname, where, why) in enumerate(refusals):
            if _refusal_layer(where, [name]) is not None:
                reasons.append(f"{pname}: {why}")
                claimed.add(i)
        layers.append({"layer": name, "outcome": what, "reasons": reasons,
                       "attention_backend": _attention_backend(name)})
    other = [f"{p}: {w}: {y}" for i, (p, w, y) in enumerate(refusals) if i not in claimed]
    return {
        "kind": "graph",
        "decision": decision,
        "matched_counts": dict(getattr(manager, "matched_counts", {}) or {}),
        "pass_ms": {k: round(v, 3) for k, v in (getattr(manager, "pass_ms", {}) or {}).items()},
        "pattern_counts": {k: v for p in passes if ran_by_pass.get(p.name)
                           for k, v in sorted(getattr(p, "pattern_counts", {}).items())},
        "ops_before": before["ops"],
        "forms_before": before.get("forms", {}),
        "layers": layers,
        "other_refusals": other,
        "machine": machine_facts(),
    }


# --- vLLM ----------------------------------------------------------------------------

def _name_or_none(value) -> str | None:
    return None if value is None else str(getattr(value, "name", value))


def vllm_config_facts(vllm_config) -> dict:
    """What decides whether our passes can see a whole MLA layer in vLLM."""
    cc = vllm_config.compilation_config
    pc = cc.pass_config
    mode = getattr(cc.mode, "name", str(cc.mode))
    sched = vllm_config.scheduler_config
    return {
        "flag": bool(getattr(pc, "fuse_aiter_qk_rope_kvcache_mla", False)),
        "mode": mode,
        "use_inductor_graph_partition": bool(getattr(cc, "use_inductor_graph_partition", False)),
        "splitting_ops": [str(s) for s in (getattr(cc, "splitting_ops", None) or [])],
        "max_num_seqs": getattr(sched, "max_num_seqs", None),
        "threshold_override": getattr(pc, "aiter_qk_rope_kvcache_fusion_max_token_num", None),
        "compile_ranges_endpoints": list(getattr(cc, "compile_ranges_endpoints", None) or []),
        "debug_dump_path": None if cc.debug_dump_path is None else str(cc.debug_dump_path),
        # vLLM derives these from the machine (on CPU: the MLA backend, and with it
        # block size, chunked prefill and the token budget that ends the top range)
        "attention_backend_asked": _name_or_none(getattr(getattr(vllm_config, "attention_config", None),
                                                         "backend", None)),
        "block_size": getattr(getattr(vllm_config, "cache_config", None), "block_size", None),
        "max_num_batched_tokens": getattr(sched, "max_num_batched_tokens", None),
        "enable_chunked_prefill": getattr(sched, "enable_chunked_prefill", None),
        "enforce_eager": bool(getattr(vllm_config.model_config, "enforce_eager", False))
        if getattr(vllm_config, "model_config", None) is not None else None,
        # whether vLLM runs the model's attention as MLA (None: no model config)
        "use_mla": getattr(vllm_config.model_config, "use_mla", None)
        if getattr(vllm_config, "model_config", None) is not None else None,
        "vllm_version": _vllm_version(),
    }


def _vllm_version() -> str | None:
    mod = sys.modules.get("vllm")
    return None if mod is None else str(getattr(mod, "__version__", None))


def vllm_record_dirs(vllm_config) -> list:
    """Where records of this vLLM config go: ``compile_debug_dump_path()``
    when ``debug_dump_path`` is set, and ``$MLA_PASSES_EXPLAIN_DIR`` when set."""
    out = []
    if vllm_config.compilation_config.debug_dump_path:
        out.append(Path(vllm_config.compile_debug_dump_path()))
    env = os.environ.get(ENV_DIR)
    if env and all(Path(env).resolve() != d.resolve() for d in out):
        out.append(Path(env))
    return out


def note_vllm_config(vllm_config, manager=None) -> None:
    """Called by the vLLM plugin for every vLLM config (flag on or off):
    write a ``vllm_config`` record, and attach ``manager`` (flag on) to
    vLLM's dump folder so it writes its records, and on CPU its graphs,
    there (``$MLA_PASSES_EXPLAIN_DIR`` gets records from :func:`sinks_of`)."""
    try:
        dirs = vllm_record_dirs(vllm_config)
        if not dirs:
            return
        facts = vllm_config_facts(vllm_config)
        if manager is not None and vllm_config.compilation_config.debug_dump_path:
            # vLLM runs depyf (and so collects our lazy_format_graph_code
            # graphs) only in VLLM_COMPILE mode: elsewhere we write them.
            attach(manager, dirs[0], write_graphs=facts["mode"] != "VLLM_COMPILE", source="vLLM plugin",
                   vllm_relative=True)
        elif manager is not None:
            attach(manager, dirs[0], source="vLLM plugin")
        key = json.dumps([facts, [str(d) for d in dirs]], sort_keys=True, default=str)
        if key in _noted:
            return
        _noted.add(key)
        for d in dirs:
            append_record(d, {"kind": "vllm_config", **facts})
    except Exception:
        logger.debug("mla-passes explain: could not note the vLLM config", exc_info=True)


_noted: set = set()
