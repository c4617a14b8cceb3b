"""A torch.compile backend that runs mla-passes and snapshots the graph.

``TestBackend(pass_manager)`` compiles with Inductor, installing a
``post_grad_custom_post_pass`` that records the post-grad graph before and
after ``pass_manager`` ran (as text and as op counts that also see ops
wrapped in ``auto_functionalized``/``auto_functionalized_v2``). With
``pass_manager=None`` it records the same graph with no pass, for the
"passes off" baseline. ``inductor=False`` uses ``aot_autograd`` with
Inductor's decompositions and runs the post-grad-like graph eagerly instead
of generating code: much faster, used by the property tests.

vLLM turns ``enable_auto_functionalized_v2`` off; so does this backend by
default (``functionalized_v2=True`` to test the v2 form).
"""

from __future__ import annotations

import collections
import re

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

_AF = (auto_functionalized, auto_functionalized_v2)


def op_counts(graph: torch.fx.Graph) -> collections.Counter:
    """Count call targets by name; an op inside auto_functionalized counts as itself."""
    counts = collections.Counter()
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        t = n.target
        if t in _AF:
            t = n.args[0]
        counts[_name(t)] += 1
    return counts


def _name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}"
    return getattr(target, "__name__", str(target))


def normalized_code(graph: torch.fx.Graph) -> str:
    """Graph text without node-number noise, for comparisons."""
    gm = torch.fx.GraphModule(torch.nn.Module(), graph) if graph.owning_module is None else graph.owning_module
    code = gm.print_readable(print_output=False, include_stride=True, include_device=True)
    return re.sub(r"#.*", "", code)


class _Recorder(CustomGraphPass):
    def __init__(self, backend: "TestBackend"):
        self.backend = backend

    def __call__(self, graph: torch.fx.Graph) -> None:
        b = self.backend
        b.graphs_before.append(str(graph))
        b.counts_before.append(op_counts(graph))
        if b.pass_manager is not None:
            b.pass_manager(graph)
            b.matched.append(dict(b.pass_manager.matched_counts))
        b.graphs_after.append(str(graph))
        b.counts_after.append(op_counts(graph))

    def uuid(self):
        pm = self.backend.pass_manager
        return None if pm is None else pm.uuid()


class TestBackend:
    """torch.compile backend: Inductor (or aot-eager) plus the passes, with snapshots."""

    __test__ = False  # not a pytest class

    def __init__(self, pass_manager=None, *, inductor: bool = True, functionalized_v2: bool = False):
        self.pass_manager = pass_manager
        self.inductor = inductor
        self.functionalized_v2 = functionalized_v2
        self.graphs_before: list[str] = []
        self.graphs_after: list[str] = []
        self.counts_before: list[collections.Counter] = []
        self.counts_after: list[collections.Counter] = []
        self.matched: list[dict] = []

    @property
    def graph_before(self) -> str:
        return self.graphs_before[-1]

    @property
    def graph_after(self) -> str:
        return self.graphs_after[-1]

    def count_before(self, op: str) -> int:
        return self.counts_before[-1][op]

    def count_after(self, op: str) -> int:
        return self.counts_after[-1][op]

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        recorder = _Recorder(self)
        patch = {"enable_auto_functionalized_v2": self.functionalized_v2}
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx

            patch["post_grad_custom_post_pass"] = recorder
            # no FX graph cache: a cache hit would skip the passes and the snapshots
            patch["fx_graph_cache"] = False
            with torch._inductor.config.patch(patch):
                return compile_fx(gm, example_inputs)

        from torch._dynamo.backends.common import aot_autograd
        from torch._inductor.decomposition import select_decomp_table
        from torch._inductor.fx_passes.post_grad import remove_noop_ops

        def fw(g, inputs):
            remove_noop_ops(g.graph)
            recorder(g.graph)
            g.recompile()
            return g

        with torch._inductor.config.patch(patch):
            return aot_autograd(fw_compiler=fw, decompositions=select_decomp_table())(gm, example_inputs)


def capture_graph(module, stack, T: int, *, remove_noops: bool = True) -> torch.fx.Graph:
    """The post-grad-like graph of ``module`` run on ``stack``'s inputs for
    ``T`` tokens (aot_autograd with Inductor's decompositions, v1
    ``auto_functionalized`` as vLLM has it), with no pass run. For tests and
    benchmarks that call the passes on a graph directly."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.fx_passes.post_grad import remove_noop_ops

    from .models import set_step

    captured = []

    def fw(gm, inputs):
        if remove_noops:
            remove_noop_ops(gm.graph)
        captured.append(gm.graph)
        return gm

    torch._dynamo.reset()
    with torch._inductor.config.patch(enable_auto_functionalized_v2=False):
        compiled = torch.compile(module, fullgraph=True,
                                 backend=aot_autograd(fw_compiler=fw, decompositions=select_decomp_table()))
        pos, h = stack.make_inputs(T)
        set_step(stack, T)
        with torch.no_grad():
            compiled(pos, h)
    return captured[0]


__all__ = ["TestBackend", "capture_graph", "op_counts", "normalized_code", "get_hash_for_files"]
