"""Near-misses the fusion must leave alone (numbers still right)."""

from __future__ import annotations

import torch
from torch import nn

from conftest import make_pm, run_case
from mla_passes.testing import standins
from mla_passes.testing.models import MLADecodeStack, build_decode_stack, _rope_native
from mla_passes.ops import LayerName


class _SwappedPair(nn.Module):
    """Two layers whose RoPE + cache update belong to one layer_name and whose
    attention (fed by that RoPE) is called with the other one."""

    def __init__(self, stack):
        super().__init__()
        self.a, self.b = stack.module.layers
        self.cos_sin_cache = stack.module.cos_sin_cache

    def _prep(self, layer, positions, hidden):
        ln = LayerName(layer.layer_name)
        q = (hidden @ layer.w_q).view(-1, layer.H, layer.P + layer.R)
        kv_c, k_pe = (hidden @ layer.w_kv).split([layer.L, layer.R], dim=-1)
        k_pe = k_pe.unsqueeze(1)
        q[..., layer.P:], k_pe = _rope_native(positions, q[..., layer.P:], k_pe, self.cos_sin_cache, layer.is_neox)
        dep = standins.kv_cache_update(kv_c, k_pe, ln, layer.kv_cache_dtype, layer.k_scale)
        return q, kv_c, k_pe, dep

    def forward(self, positions, hidden):
        qa, kva, kpa, depa = self._prep(self.a, positions, hidden)
        qb, kvb, kpb, depb = self._prep(self.b, positions, hidden)
        outs = []
        for layer, (q, kv, kp, dep) in ((self.b, (qa, kva, kpa, depa)), (self.a, (qb, kvb, kpb, depb))):
            out = torch.empty((hidden.shape[0], layer.H * layer.V), dtype=q.dtype)
            standins.attention_with_output(q, kv, kp, out, LayerName(layer.layer_name), kv_cache_dummy_dep=dep)
            outs.append(out)
        return torch.cat(outs, dim=-1)


def _leaky_forward(layer, positions, hidden, cos_sin_cache, leak):
    """MLADecodeLayer.forward with GPT-J RoPE whose q intermediate ``x1*cos - x2*sin`` leaks out."""
    T = hidden.shape[0]
    ln = LayerName(layer.layer_name)
    q = (hidden @ layer.w_q).view(-1, layer.H, layer.P + layer.R)
    kv_c, k_pe = (hidden @ layer.w_kv).split([layer.L, layer.R], dim=-1)
    k_pe = k_pe.unsqueeze(1)
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    c, s_ = cos.unsqueeze(-2), sin.unsqueeze(-2)

    def rot(x):
        x1, x2 = x[..., ::2], x[..., 1::2]
        o1 = x1 * c - x2 * s_
        return torch.stack((o1, x2 * c + x1 * s_), dim=-1).flatten(-2), o1

    q_rot, o1 = rot(q[..., layer.P:])
    q[..., layer.P:] = q_rot
    k_pe, _ = rot(k_pe)
    leak.append(o1)
    dep = standins.kv_cache_update(kv_c, k_pe, ln, layer.kv_cache_dtype, layer.k_scale)
    out = torch.empty((T, layer.H * layer.V), dtype=q.dtype)
    standins.attention_with_output(q, kv_c, k_pe, out, ln, kv_cache_dummy_dep=dep)
    return hidden + out @ layer.w_o


class _ExtraUser(nn.Module):
    """Layer 0's RoPE intermediate has a user outside the RoPE (an extra output)."""

    def __init__(self, stack):
        super().__init__()
        self.inner = stack.module

    def forward(self, positions, hidden):
        leak = []
        a, b = self.inner.layers
        hidden = _leaky_forward(a, positions, hidden, self.inner.cos_sin_cache, leak)
        hidden = b(positions, hidden, self.inner.cos_sin_cache)
        return hidden + leak[0].sum().to(hidden.dtype)


class _StackWrapper:
    def __init__(self, stack, module):
        self.__dict__.update(stack.__dict__)
        self._stack = stack
        self.module = module

    def make_inputs(self, *a, **k):
        return self._stack.make_inputs(*a, **k)

    def snapshot_caches(self):
        return self._stack.snapshot_caches()

    def restore_caches(self, s):
        self._stack.restore_caches(s)


def test_rope_and_attention_of_different_layers_not_fused():
    """RoPE/cache update of layer A feeding layer B's attention must not be fused."""
    st = build_decode_stack(2, H=4, hidden=64)
    pm = make_pm()
    res = run_case(pm, stack=_StackWrapper(st, _SwappedPair(st)))
    assert pm.matched_counts["mla_qk_rope_kvcache_fusion"] == 0
    assert pm.matched_counts["mla_decode_q_prep_lift"] == 2  # attention alone is still fine to lift
    assert res.backend.count_after("mla_passes.mla_fused_decode_prep") == 0


def test_extra_user_of_rope_intermediate_not_fused():
    """A RoPE intermediate the fusion would delete has another user: that layer is left alone."""
    st = build_decode_stack(2, H=4, hidden=64, is_neox=False)
    pm = make_pm()
    res = run_case(pm, stack=_StackWrapper(st, _ExtraUser(st)))
    assert pm.matched_counts == {"mla_qk_rope_kvcache_fusion": 1, "mla_decode_q_prep_lift": 1}
    assert res.backend.count_after("mla_passes.mla_fused_decode_prep") == 1


def test_non_mla_attention_untouched():
    """RoPE feeding a plain SDPA (no MLA ops) is not matched."""

    class Plain(nn.Module):
        def forward(self, positions, x, cos_sin_cache):
            q = x.view(-1, 2, 64)
            k = x.view(-1, 2, 64) * 2
            q, k = _rope_native(positions, q, k, cos_sin_cache, False)
            return torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                                                    k.transpose(0, 1))

    from mla_passes.testing import make_cos_sin_cache
    from mla_passes.testing.backend import TestBackend

    pm = make_pm()
    b = TestBackend(pm, inductor=False)
    f = torch.compile(Plain(), backend=b, fullgraph=True)
    x = torch.randn(5, 128)
    pos = torch.randint(0, 64, (5,))
    cs = make_cos_sin_cache(64, 64)
    torch.testing.assert_close(f(pos, x, cs), Plain()(pos, x, cs))
    assert b.graph_before == b.graph_after
