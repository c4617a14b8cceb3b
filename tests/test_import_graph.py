"""The package's layering, from every import in the code (``tools/import_graph.py``): no cycle
between modules nor between packages, and no import running up the layers of CONTRIBUTING."""

from __future__ import annotations

import pytest

from tools import import_graph


@pytest.fixture(scope="module")
def graph():
    known = import_graph.modules()
    return known, import_graph.edges(known)


def test_the_graph_sees_imports_inside_functions_and_parent_packages(graph):
    known, es = graph
    assert "mla_passes.patterns.rope" in known and "tools.gpu_vllm" in known
    # patterns import the FX helpers at the top; importing a submodule runs its package's __init__
    assert ("mla_passes.patterns.rope", "mla_passes.fx", False) in es
    assert any(a == "mla_passes.diagnostics.report" and b == "mla_passes.vllm" for a, b, _ in es)
    assert any(nested for *_, nested in es)  # imports inside functions are drawn too


@pytest.mark.parametrize("level", ["module", "package"])
def test_no_cycle(graph, level):
    known, es = graph
    nodes, adj, _ = import_graph.graph_at(level, known, es)
    assert import_graph.cycles(nodes, adj) == []


def test_cycles_are_found():
    """The check can fail: a two-module loop is a cycle."""
    assert import_graph.cycles({"a", "b", "c"}, {"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_import_runs_up_the_layers(graph):
    _, es = graph
    assert import_graph.upward(es) == []
    assert import_graph.upward([("mla_passes.kernels.backends", "mla_passes.passes.fusion", True)])  # can fail
