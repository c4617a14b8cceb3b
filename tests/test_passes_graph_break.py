"""A graph break inside the stand-in layer loop (issue 11 item 15).

Cause (ours): Dynamo could not resume inside the loop, ran the frame eagerly
with its frame hook still on, and so compiled the Python impls of our ops as
new frames; tracing ``layer_name_str`` there, its ``real_obj`` unwrapping
recursed without end on Dynamo's model of the opaque ``LayerName``. Our op
impls are now registered through ``torch.compiler.disable`` (as
``torch.library.custom_op`` does for its kernels) and ``layer_name_str``
unwraps ``real_obj`` once.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import CaseResult, assert_close_case, make_pm, run_both
from mla_passes.testing import standins
from mla_passes.layers import layer_name_str
from mla_passes.testing.models import build_decode_stack, set_step
from mla_passes.ops import LayerName
from mla_passes.testing.backend import TestBackend


class BreakInLoop(nn.Module):
    """The stand-in decode layers, with a graph break at ``where`` in every layer."""

    def __init__(self, stack, where):
        super().__init__()
        self.layers = stack.module.layers
        self.where = where

    def forward(self, positions, hidden):
        for ly in self.layers:
            ln = LayerName(ly.layer_name)
            if self.where == "after_layer_name":
                torch._dynamo.graph_break()
            q = (hidden @ ly.w_q).view(-1, ly.H, ly.P + ly.R)
            kv_c, k_pe = (hidden @ ly.w_kv).split([ly.L, ly.R], dim=-1)
            k_pe = k_pe.unsqueeze(1)
            dep = standins.kv_cache_update(kv_c, k_pe, ln, ly.kv_cache_dtype, ly.k_scale)
            if self.where == "after_cache_update":
                torch._dynamo.graph_break()
            out = torch.empty((hidden.shape[0], ly.H * ly.V), dtype=q.dtype)
            standins.attention_with_output(q, kv_c, k_pe, out, ln, kv_cache_dummy_dep=dep)
            hidden = hidden + out @ ly.w_o
        return hidden


@pytest.mark.parametrize("where", ["after_layer_name", "after_cache_update"])
@pytest.mark.parametrize("with_passes", [False, True])
def test_graph_break_in_layer_loop(where, with_passes):
    """A graph break in the layer loop raised a Dynamo RecursionError (backend="eager", no passes)."""
    st = build_decode_stack(2, H=4, hidden=64)
    module = BreakInLoop(st, where)
    backend = TestBackend(make_pm(), inductor=False) if with_passes else "eager"
    compiled = torch.compile(module, backend=backend)
    pos, h = st.make_inputs(4, seed=3)
    set_step(st, 4, seed=4)
    st.module = module  # run_both runs st.module eagerly
    eager, ref_caches, out, _ = run_both(st, compiled, pos, h)
    assert_close_case(CaseResult(st, None, None, eager, out, ref_caches, st.snapshot_caches()))


def test_layer_name_str_unwraps_once():
    """An object whose real_obj is itself (as Dynamo models an opaque value) is an error, not a recursion."""

    class SelfReal:
        @property
        def real_obj(self):
            return self

    with pytest.raises(TypeError, match="layer_name"):
        layer_name_str(SelfReal())
    assert layer_name_str(LayerName("a.b")) == "a.b"
