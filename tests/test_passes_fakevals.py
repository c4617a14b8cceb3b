"""``meta["val"]`` of the nodes the passes insert: built without a fake-mode
dispatch where the output is a new tensor, yet equal to what the dispatch
gives; own storage for new outputs, real views for views."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.source
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from conftest import make_pm
from mla_passes import ops
from mla_passes import fx

FUSED = torch.ops.mla_passes.mla_fused_decode_prep.default


def _fake(mode, shape, dtype, name, dynamic):
    t = torch.empty(shape, dtype=dtype)
    if not dynamic:
        return mode.from_tensor(t)
    ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (t.dim() - 1))
    return mode.from_tensor(t, symbolic_context=ctx, source=torch._dynamo.source.ConstantSource(name))


def _same(a, b):
    assert type(a) is type(b) is FakeTensor and a.fake_mode is b.fake_mode
    assert (a.shape, a.stride(), a.storage_offset(), a.dtype, a.device, a.layout, a.requires_grad) == \
        (b.shape, b.stride(), b.storage_offset(), b.dtype, b.device, b.layout, b.requires_grad)
    assert a.is_contiguous() == b.is_contiguous() and a._is_view() == b._is_view()
    assert a.untyped_storage().nbytes() == b.untyped_storage().nbytes()
    assert torch._C._dispatch_keys(a) == torch._C._dispatch_keys(b)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_fresh_fake_equals_dispatched_fake(dynamic, out_dtype):
    """A new output's fake built directly must equal the fake impl's new_empty under the mode."""
    mode = FakeTensorMode(shape_env=ShapeEnv())
    q = _fake(mode, (8, 16, 192), torch.bfloat16, "q", dynamic)
    kv_c = _fake(mode, (8, 512), torch.bfloat16, "kv_c", dynamic)
    k_pe = _fake(mode, (8, 64), torch.bfloat16, "k_pe", dynamic)
    args = (q, kv_c, k_pe, None, None, False, None, out_dtype, "auto")
    like, shape, dtype = ops._fused_decode_prep_out_spec(*args)
    got = fx.fresh_fake(mode, like, shape, dtype)
    with mode:
        want = ops._fused_decode_prep_fake(*args)
    _same(got, want)
    assert got.untyped_storage()._cdata != q.untyped_storage()._cdata


def test_inserted_vals_own_storage_and_real_views():
    """Each inserted tensor node has its own fake of the graph's mode; views share their base's storage."""
    from mla_passes.bench.passes import capture_graph, copy_graph

    graph = copy_graph(capture_graph(3, H=4, T=5, form="raw"))
    before = set(graph.nodes)
    mode = fx.graph_fake_mode(graph)
    pm = make_pm()
    pm(graph)
    assert pm.matched_counts["mla_qk_rope_kvcache_fusion"] == 3
    new = [n for n in graph.nodes if n not in before]
    fused = [n for n in new if n.target is FUSED]
    assert len(fused) == 3
    storages = {}
    for n in graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            storages.setdefault(v.untyped_storage()._cdata, []).append(n)
    for n in fused:
        v = n.meta["val"]
        assert isinstance(v, FakeTensor) and v.fake_mode is mode
        with mode:
            want = ops._fused_decode_prep_fake(*torch.fx.node.map_arg(n.args, fx.val))
        _same(v, want)
        assert storages[v.untyped_storage()._cdata] == [n], "a new output shares no storage"
    views = [n for n in new if fx.is_view(n) and isinstance(n.meta.get("val"), torch.Tensor)]
    assert len(views) == 3  # k_pe as the attention reads it, one per layer
    for n in views:
        v, src = n.meta["val"], fx.val(fx.view_source(n))
        assert v._is_view() and v.untyped_storage()._cdata == src.untyped_storage()._cdata
