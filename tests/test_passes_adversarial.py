"""Graphs an adversarial user builds (issue 11, items 2-4 and 6): the fusion
either rewrites them exactly or leaves the layer alone; eager == compiled,
caches included, and no exception escapes the passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_close_case, CaseResult, make_pm
from mla_passes.testing import standins
from mla_passes.testing.models import _rope_native, build_decode_stack, set_step
from mla_passes.ops import LayerName
from mla_passes.testing.backend import TestBackend
from mla_passes import MLAPassManager, PassConfig
from mla_passes.gating import compile_range

FUSION = "mla_qk_rope_kvcache_fusion"
LIFT = "mla_decode_q_prep_lift"


def _rms(x):
    """The model's kv_c normalization (a new tensor, as vLLM's RMSNorm gives)."""
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)


class Variant(nn.Module):
    """A decode stack whose layers deviate from the plain form in chosen ways.

    * ``k_attn``: the k_pe the attention reads: ``"rotated"`` (the plain
      form), ``"clone"`` (a clone of the unrotated k), ``"projection"`` (a
      second projection of the hidden state);
    * ``k_scale_factor``: the graph's k_scale is the layer state's times this;
    * ``rope_fp32``: RoPE computed in fp32 (raw form), the rotated q_pe cast
      back into q by the assignment;
    * ``leak_q_rot``: the rotated q_pe (of every layer) is also a graph output.

    ``forward`` returns ``(hidden, [extra outputs])``.
    """

    def __init__(self, stack, *, form="raw", k_attn="rotated", k_scale_factor=1.0, rope_fp32=False,
                 leak_q_rot=False):
        super().__init__()
        self.layers = stack.module.layers
        self.register_buffer("cos_sin_cache", stack.module.cos_sin_cache.float() if rope_fp32
                             else stack.module.cos_sin_cache)
        self.form, self.k_attn, self.rope_fp32, self.leak = form, k_attn, rope_fp32, leak_q_rot
        self.k_scales = [layer.k_scale * k_scale_factor for layer in self.layers]

    def _layer(self, i, layer, positions, hidden, extras):
        P, R, L, H = layer.P, layer.R, layer.L, layer.H
        ln = LayerName(layer.layer_name)
        q = (hidden @ layer.w_q).view(-1, H, P + R)
        kv_c, k_pe = (hidden @ layer.w_kv).split([L, R], dim=-1)
        kv_c = _rms(kv_c)
        if self.k_attn == "clone":
            k_other = k_pe.clone()
        elif self.k_attn == "projection":
            k_other = hidden @ layer.w_kv[:, L:]
        k_scale = self.k_scales[i]
        if self.form == "raw":
            k3 = k_pe.unsqueeze(1)
            if self.rope_fp32:
                q_rot, k_rot = _rope_native(positions, q[..., P:].float(), k3.float(), self.cos_sin_cache,
                                            layer.is_neox)
                k_rot = k_rot.to(k3.dtype)
            else:
                q_rot, k_rot = _rope_native(positions, q[..., P:], k3, self.cos_sin_cache, layer.is_neox)
            q[..., P:] = q_rot
            if self.leak:
                extras.append(q_rot)
            dep = standins.kv_cache_update(kv_c, k_rot, ln, layer.kv_cache_dtype, k_scale)
        else:
            dep = standins.fused_rope_kv_cache_update(positions, q[..., P:], k_pe, kv_c, self.cos_sin_cache,
                                                      layer.is_neox, layer.kv_cache_dtype, k_scale, ln)
            k_rot = k_pe.unsqueeze(1)
            if self.leak:
                extras.append(q[..., P:] * 1)
        k_for_attn = k_rot if self.k_attn == "rotated" else k_other.unsqueeze(1)
        out = torch.empty((hidden.shape[0], H * layer.V), dtype=q.dtype)
        standins.attention_with_output(q, kv_c, k_for_attn, out, ln, kv_cache_dummy_dep=dep)
        return hidden + out @ layer.w_o

    def forward(self, positions, hidden):
        extras = []
        for i, layer in enumerate(self.layers):
            hidden = self._layer(i, layer, positions, hidden, extras)
        return hidden, extras


def run_variant(st, module, *, T=5, num_decode_tokens=2, inductor=False, pm=None):
    """Eager vs compiled (fresh inputs, same caches); returns (pm, backend).
    fp32 extra outputs must agree to fp32 rounding, the rest within bf16/fp8 noise."""
    pm = pm or make_pm()
    b = TestBackend(pm, inductor=inductor)
    compiled = torch.compile(module, backend=b, fullgraph=True)
    pos, h = st.make_inputs(T, seed=11 + T)
    set_step(st, T, num_decode_tokens=num_decode_tokens, seed=3)
    snap = st.snapshot_caches()
    with torch.no_grad():
        eager, eager_extras = module(pos, h)
    eager_caches = st.snapshot_caches()
    st.restore_caches(snap)
    with torch.no_grad():
        out, extras = compiled(pos, h)
    assert_close_case(CaseResult(st, b, pm, eager, out, eager_caches, st.snapshot_caches()))
    assert len(extras) == len(eager_extras)
    for got, ref in zip(extras, eager_extras):
        assert got.dtype == ref.dtype, (got.dtype, ref.dtype)
        if ref.dtype == torch.float32:  # an fp32 value stays the same fp32 value
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        else:  # eager's bf16 RoPE rounds each step; the fused op rounds once
            torch.testing.assert_close(got.float(), ref.float(), rtol=2**-6, atol=2**-6)
    return pm, b


# --- item 2: the attention's k_pe ------------------------------------------------------

@pytest.mark.parametrize("form", ["raw", "fused_rope"])
@pytest.mark.parametrize("k_attn", ["clone", "projection"])
def test_attention_reading_another_k_pe_not_fused(form, k_attn):
    """Fused-rope form: an attention reading a k_pe other than the rotated one was fused (output off ~14%)."""
    st = build_decode_stack(2, H=4, hidden=64, form=form)
    pm, _ = run_variant(st, Variant(st, form=form, k_attn=k_attn))
    assert pm.matched_counts[FUSION] == 0
    assert pm.matched_counts[LIFT] == 2


@pytest.mark.parametrize("form", ["raw", "fused_rope"])
def test_attention_reading_rotated_k_pe_fused(form):
    """The same harness with the plain wiring is fused (the refusals above are not blanket)."""
    st = build_decode_stack(2, H=4, hidden=64, form=form)
    pm, _ = run_variant(st, Variant(st, form=form))
    assert pm.matched_counts[FUSION] == 2


# --- item 3: operands the graph carries ------------------------------------------------

@pytest.mark.parametrize("form", ["raw", "fused_rope"])
@pytest.mark.parametrize("inductor", [False, True])
def test_graph_k_scale_used(form, inductor):
    """The fused op read k_scale from the layer state, not the graph's cache update: fp8 cache rows off 2x."""
    st = build_decode_stack(1, H=4, hidden=64, form=form, kv_cache_dtype="fp8")
    pm, _ = run_variant(st, Variant(st, form=form, k_scale_factor=2.0), inductor=inductor)
    assert pm.matched_counts[FUSION] == 1


# --- item 4: dtypes of values the rewrite replaces --------------------------------------

@pytest.mark.parametrize("leak", [False, True])
def test_fp32_rope_value_keeps_its_dtype(leak):
    """RoPE in fp32 whose rotated q_pe is also a graph output: that output became bf16 after the rewrite."""
    st = build_decode_stack(2, H=4, hidden=64)
    pm, _ = run_variant(st, Variant(st, rope_fp32=True, leak_q_rot=leak))
    # fused only when no reader needs the fp32 value
    assert pm.matched_counts[FUSION] == (0 if leak else 2)


def test_fused_rope_q_pe_reader_fused():
    """Fused-rope form: a reader of the rotated q_pe gets the same values after the rewrite."""
    st = build_decode_stack(2, H=4, hidden=64, form="fused_rope")
    pm, _ = run_variant(st, Variant(st, form="fused_rope", leak_q_rot=True))
    assert pm.matched_counts[FUSION] == 2


class _AsVllmLeavesIt(MLAPassManager):
    """Moves each fused-rope op before the producer of its kv_c, as vLLM's MLA RoPE/KV-cache fusion
    leaves it (the pattern matcher does not order the graph; vLLM's cleanup sorts it after our pass)."""

    def __call__(self, graph):
        for n in list(graph.nodes):
            if n.target is torch.ops.higher_order.auto_functionalized and "fused_rope" in str(n.args[0]):
                n.kwargs["kv_c"].prepend(n)
        super().__call__(graph)


def test_fused_rope_op_before_its_kv_c_is_fused():
    """Real vLLM on an H200, DeepSeek-V3 (q_lora): the fused-rope op stood before the kv_c RMSNorm it
    reads (vLLM sorts only after our pass), and every layer was refused "not defined before the fusion point"."""
    st = build_decode_stack(2, H=4, hidden=64, form="fused_rope")
    pm = _AsVllmLeavesIt(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True), max_num_seqs=256)
    pm, _ = run_variant(st, Variant(st, form="fused_rope"), pm=pm)
    assert pm.matched_counts[FUSION] == 2


def test_graph_without_an_order_left_alone():
    """A graph with a cycle (no dependency order exists): the sort before planning raised an AssertionError out
    of the pass manager, failing the user's compile; now the graph is left as it was, and the decision says why."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.ops.aten.add.Tensor, (x, x))
    b = g.call_function(torch.ops.aten.mul.Tensor, (a, x))
    a.args = (x, b)
    g.output(b)
    before = [(n.name, n.args) for n in g.nodes]
    pm = make_pm()
    with compile_range(4):  # a decode-range graph: the passes would run
        pm(g)
    assert [(n.name, n.args) for n in g.nodes] == before
    assert "no dependency order" in pm.last_decision


# --- item 6: graphs that raised KeyError inside the passes ------------------------------

class _OneLayer(nn.Module):
    """Layer 0 of ``stack`` and its cos/sin table, for hand-written layer variants."""

    def __init__(self, stack):
        super().__init__()
        self.layer = stack.module.layers[0]
        self.cos_sin_cache = stack.module.cos_sin_cache

    def attend(self, hidden, q, kv_c, k_rot, ln, dep):
        """The layer's attention (same ``ln`` object as the cache update) and output projection."""
        ly = self.layer
        out = torch.empty((hidden.shape[0], ly.H * ly.V), dtype=q.dtype)
        standins.attention_with_output(q, kv_c, k_rot, out, ln, kv_cache_dummy_dep=dep)
        return hidden + out @ ly.w_o


class SharedProjectionScaledQ(_OneLayer):
    """q and k from one projection; the rotated q_pe is scattered into ``q * 2``."""

    def forward(self, positions, hidden):
        ly = self.layer
        P, R, L, H = ly.P, ly.R, ly.L, ly.H
        ln = LayerName(ly.layer_name)
        qk = hidden @ torch.cat((ly.w_q, ly.w_kv), dim=1)
        q = qk[:, :H * (P + R)].view(-1, H, P + R)
        kv_c, k_pe = qk[:, H * (P + R):].split([L, R], dim=-1)
        kv_c = _rms(kv_c)
        q_rot, k_rot = _rope_native(positions, q[..., P:], k_pe.unsqueeze(1), self.cos_sin_cache, ly.is_neox)
        q2 = q * 2
        q2[..., P:] = q_rot
        dep = standins.kv_cache_update(kv_c, k_rot, ln, ly.kv_cache_dtype, ly.k_scale)
        return self.attend(hidden, q2, kv_c, k_rot, ln, dep), []


class ChainedK(nn.Module):
    """Layer 1's RoPE reads layer 0's rotated k_pe (its own k projection unused for RoPE)."""

    def __init__(self, stack):
        super().__init__()
        self.layers = stack.module.layers
        self.cos_sin_cache = stack.module.cos_sin_cache

    def forward(self, positions, hidden):
        prev_k = None
        for ly in self.layers:
            P, R, L, H = ly.P, ly.R, ly.L, ly.H
            ln = LayerName(ly.layer_name)
            q = (hidden @ ly.w_q).view(-1, H, P + R)
            kv_c, k_pe = (hidden @ ly.w_kv).split([L, R], dim=-1)
            kv_c = _rms(kv_c)
            k_in = k_pe.unsqueeze(1) if prev_k is None else prev_k
            q[..., P:], k_rot = _rope_native(positions, q[..., P:], k_in, self.cos_sin_cache, ly.is_neox)
            dep = standins.kv_cache_update(kv_c, k_rot, ln, ly.kv_cache_dtype, ly.k_scale)
            out = torch.empty((hidden.shape[0], H * ly.V), dtype=q.dtype)
            standins.attention_with_output(q, kv_c, k_rot, out, ln, kv_cache_dummy_dep=dep)
            hidden = hidden + out @ ly.w_o
            prev_k = k_rot
        return hidden, []


def test_rope_into_scaled_q_refused():
    """RoPE evaluation raised KeyError when the rotated q_pe went into ``q * 2`` (q, k from one projection)."""
    st = build_decode_stack(1, H=4, hidden=64)
    pm, _ = run_variant(st, SharedProjectionScaledQ(st))
    assert pm.matched_counts[FUSION] == 0
    assert pm.matched_counts[LIFT] == 1


def test_layer_reading_previous_layers_rotated_k():
    """The node-order index raised KeyError on nodes an earlier layer's rewrite inserted."""
    st = build_decode_stack(2, H=4, hidden=64)
    pm, _ = run_variant(st, ChainedK(st))
    assert pm.matched_counts[FUSION] + pm.matched_counts[LIFT] == 2
    assert pm.matched_counts[FUSION] >= 1


def test_unexpected_error_becomes_refusal(monkeypatch, caplog):
    """Outside strict mode an exception while matching a layer refuses that layer with a warning naming it."""
    from mla_passes.passes import fusion_raw

    def boom(*a, **k):
        raise RuntimeError("planted")

    monkeypatch.setattr(fusion_raw.RawFormPlanner, "plan", boom)
    monkeypatch.setenv("MLA_PASSES_STRICT", "0")
    st = build_decode_stack(2, H=4, hidden=64)
    with caplog.at_level("WARNING", logger="mla_passes.passes"):
        pm, _ = run_variant(st, Variant(st))
    assert pm.matched_counts == {FUSION: 0, LIFT: 2}
    msgs = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("model.layers.0.self_attn.attn" in m and "RuntimeError" in m and "planted" in m for m in msgs), msgs
    assert any("model.layers.1.self_attn.attn" in m for m in msgs), msgs

    monkeypatch.setenv("MLA_PASSES_STRICT", "1")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="planted"):
        run_variant(st, Variant(st))


# --- aliasing: views the old hand list of view ops missed ----------------------------------

class EarlyDiagonalRead(_OneLayer):
    """Reads q's rotary columns through ``diagonal`` (a view op) before the RoPE."""

    def forward(self, positions, hidden):
        ly = self.layer
        P, R, L, H = ly.P, ly.R, ly.L, ly.H
        ln = LayerName(ly.layer_name)
        q = (hidden @ ly.w_q).view(-1, H, P + R)
        unrotated = q.diagonal(offset=P, dim1=1, dim2=2) * 3  # q[t, h, P + h], before the RoPE
        kv_c, k_pe = (hidden @ ly.w_kv).split([L, R], dim=-1)
        kv_c = _rms(kv_c)
        q[..., P:], k_rot = _rope_native(positions, q[..., P:], k_pe.unsqueeze(1), self.cos_sin_cache, ly.is_neox)
        dep = standins.kv_cache_update(kv_c, k_rot, ln, ly.kv_cache_dtype, ly.k_scale)
        return self.attend(hidden, q, kv_c, k_rot, ln, dep), unrotated


def _capture(module, st, T=5):
    """The post-grad-like graph of ``module`` (aot_autograd + Inductor decompositions), no pass run."""
    from mla_passes.testing.backend import capture_graph

    return capture_graph(module, st, T, remove_noops=False)


@pytest.mark.parametrize("sink", [False, True])
def test_late_reader_through_unlisted_view_refused(sink):
    """A reader of q's unrotated memory through ``diagonal`` (missing from the old view list) escaped the check."""
    st = build_decode_stack(1, H=4, hidden=64)
    graph = _capture(EarlyDiagonalRead(st), st)
    diag = graph.find_nodes(op="call_function", target=torch.ops.aten.diagonal.default)
    assert len(diag) == 1, "the graph keeps the diagonal view"
    (reader,) = diag[0].users
    if sink:  # a scheduler moved the read after the attention (Inductor may reorder for locality)
        attn = next(n for n in graph.nodes if n.target is torch.ops.higher_order.auto_functionalized
                    and "attention" in str(n.args[0]))
        attn.append(reader)
    pm = make_pm()
    pm(graph)
    graph.lint()
    if sink:
        assert pm.matched_counts[FUSION] == 0
        assert any("reads" in r and "after the fusion point" in r for r in pm.passes[0].refusals), \
            pm.passes[0].refusals
    else:
        assert pm.matched_counts[FUSION] == 1
