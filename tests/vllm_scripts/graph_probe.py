"""A post-grad pass for vLLM test subprocesses that records the graph it sees.

Imported by the spawned vLLM worker (the pass object travels pickled inside the
vLLM config), so it lives in an importable module, not in a ``__main__``.
Each call appends one record to the JSONL file named by ``$MLA_PROBE_OUT`` and
writes the graph text to ``<that file>.<pid>.<n>.txt``.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import torch

try:  # vLLM's VLLM_COMPILE pipeline takes only its own InductorPass (a CustomGraphPass)
    from vllm.compilation.passes.inductor_pass import InductorPass as _PassBase
except ImportError:
    from torch._inductor.custom_graph_pass import CustomGraphPass as _PassBase


def _val_str(val) -> str:
    if isinstance(val, torch.Tensor):
        return f"{val.dtype} {tuple(val.shape)} stride={tuple(val.stride())}"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(_val_str(v) for v in val) + ")"
    return repr(val)


def _compile_range():
    try:
        from vllm.compilation.passes.inductor_pass import get_pass_context
    except ImportError:  # layout differs between vLLM versions
        try:
            from vllm.compilation.inductor_pass import get_pass_context  # type: ignore
        except ImportError:
            return None
    try:
        return str(get_pass_context().compile_range)
    except Exception as e:  # no pass context outside vLLM's pass manager
        return f"<none: {type(e).__name__}: {e}>"


def _symbol_ranges(graph: torch.fx.Graph) -> dict[str, str]:
    out = {}
    for node in graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt):
            expr = val.node.expr
            shape_env = val.node.shape_env
            rng = shape_env.var_to_range.get(expr) if hasattr(shape_env, "var_to_range") else None
            out[node.name] = f"{expr} range={rng}"
    return out


def op_counts(graph: torch.fx.Graph) -> dict[str, int]:
    """Counts of call_function targets; ops wrapped in auto_functionalized
    count under their own name with an ``auto_functionalized:`` prefix."""
    counts: Counter[str] = Counter()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if "auto_functionalized" in name and node.args:
            name = f"auto_functionalized:{node.args[0]}"
        counts[name] += 1
    return dict(counts)


def _machine() -> dict:
    """The platform, the CPU features and the vLLM kernel libraries this process loaded."""
    from mla_passes.records import machine_facts

    return machine_facts()


class GraphProbePass(_PassBase):
    def __init__(self, tag: str = "probe"):
        self.tag = tag

    def __call__(self, graph: torch.fx.Graph) -> None:
        path = os.environ.get("MLA_PROBE_OUT")
        if not path:
            return
        n = sum(1 for _ in open(path)) if os.path.exists(path) else 0
        text_path = f"{path}.{os.getpid()}.{n}.txt"
        lines = [str(graph), "", "# node meta (call_function / placeholder)"]
        for node in graph.nodes:
            if node.op in ("call_function", "placeholder"):
                lines.append(f"{node.name}: {node.op} {node.target} val={_val_str(node.meta.get('val'))}")
        with open(text_path, "w") as f:
            f.write("\n".join(lines))
        try:  # what would break CUDA-graph capture of this graph (mla_passes.diagnostics.lint; never changes it)
            from mla_passes.diagnostics.lint import lint_graph

            lint = [f"{f.kind}: {f.op}" for f in lint_graph(graph)]
        except Exception as e:  # recorded, so a test sees it
            lint = [f"lint failed: {type(e).__name__}: {e}"]
        rec = {
            "tag": self.tag,
            "cudagraph_lint": lint,
            "pid": os.getpid(),
            "compile_range": _compile_range(),
            "symbols": _symbol_ranges(graph),
            "op_counts": op_counts(graph),
            "graph_file": text_path,
            "machine": _machine(),
        }
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def uuid(self):
        return f"mla-passes-test-graph-probe-{self.tag}"


def _record(rec: dict) -> None:
    path = os.environ.get("MLA_PROBE_OUT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def instrument_mla_passes() -> None:
    """Record, from inside the worker, what the real MLAPassManager matched on
    each call and how the prepped-q attention split rows (decode vs prefill).
    Test instrumentation only: wraps, never changes, what runs."""
    from mla_passes import pass_manager
    from mla_passes.vllm import compat as vllm_compat

    if getattr(pass_manager.MLAPassManager, "_probe_wrapped", False):
        return
    orig_call = pass_manager.MLAPassManager.__call__

    def __call__(self, graph):
        only = os.environ.get("MLA_PROBE_ONLY_PASSES")  # debugging aid: run a subset of the passes
        if only:
            self.passes = [p for p in self.passes if any(s in p.name for s in only.split(","))]
        orig_call(self, graph)
        _record({"tag": "manager", "pid": os.getpid(), "compile_range": _compile_range(),
                 "matched_counts": dict(self.matched_counts),
                 "pattern_counts": {k: v for p in self.passes for k, v in getattr(p, "pattern_counts", {}).items()},
                 "decision": self.last_decision, "op_counts_after": op_counts(graph)})

    pass_manager.MLAPassManager.__call__ = __call__
    pass_manager.MLAPassManager._probe_wrapped = True

    orig_attn = vllm_compat.attention_with_prepped_q

    def attention_with_prepped_q(layer_name, q, q_prepped, kv_c_normed, k_pe, output, **kw):
        from vllm.forward_context import get_forward_context

        ctx = get_forward_context()
        name = str(getattr(layer_name, "value", layer_name))
        md = ctx.attn_metadata
        md = md.get(name) if isinstance(md, dict) else md
        if md is not None:
            layer = ctx.no_compile_layers.get(name)
            _record({"tag": "attention", "pid": os.getpid(), "layer": name,
                     "backend": layer.attn_backend.get_name() if layer is not None else None,
                     "impl": type(layer.impl).__name__ if layer is not None else None,
                     "num_decode_tokens": int(md.num_decode_tokens),
                     "num_actual_tokens": int(md.num_actual_tokens), "q_prepped_dtype": str(q_prepped.dtype),
                     "q_prepped_shape": list(q_prepped.shape)})
        orig_attn(layer_name, q, q_prepped, kv_c_normed, k_pe, output, **kw)

    vllm_compat.attention_with_prepped_q = attention_with_prepped_q


if os.environ.get("MLA_PROBE_INSTRUMENT") == "1":
    instrument_mla_passes()
