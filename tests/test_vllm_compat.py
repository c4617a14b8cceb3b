"""The vLLM layer-state resolver and the prepped-q attention adapter, with vLLM's contexts faked.

No engine runs here: vLLM's forward context and attention context are
replaced by counting fakes, so these tests see how often the layer state is
looked up and which kv-cache dtypes the adapter accepts. The end-to-end runs
are in ``test_vllm_e2e.py``.
"""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("vllm")

import mla_passes  # noqa: E402,F401  (registers torch.ops.mla_passes)
from mla_passes import layers  # noqa: E402
from mla_passes.ops import LayerName  # noqa: E402
from mla_passes.vllm import compat as vllm_compat  # noqa: E402

NAME = "model.layers.0.self_attn.attn"
H, P, L, R, V = 2, 8, 16, 8, 4


class CPUMLAImpl:  # named like the vLLM impl that takes the concatenated q
    supports_quant_query_input = True

    def __init__(self):
        self.mqa_q = None

    def forward_mqa(self, q, kv_cache, attn_metadata, layer):
        self.mqa_q = q
        return torch.ones(q.shape[0], H, L), None

    def forward_mha(self, *a, **kw):  # no prefill rows in these tests
        raise AssertionError("forward_mha called")


class FakeMLA:
    """Just what the resolver and the adapter read from vLLM's MLAAttention."""

    def __init__(self, kv_cache_dtype):
        self.impl = CPUMLAImpl()
        self.kv_cache_dtype = kv_cache_dtype
        self.W_UK_T = torch.randn(H, P, L)
        self.kv_lora_rank, self.qk_rope_head_dim = L, R
        self._k_scale = torch.tensor(0.5)
        self._q_scale = torch.tensor(0.25)

    def _v_up_proj(self, attn_out, out):
        out.copy_(attn_out[..., :V].reshape(out.shape))


@pytest.fixture
def vllm_layer(monkeypatch):
    """A fake vLLM MLA layer in a fake forward context; counts attention-context lookups."""
    import vllm.forward_context as fc

    made = {}

    def make(kv_cache_dtype="auto", T=3):
        layer = FakeMLA(kv_cache_dtype)
        dtype = torch.uint8 if kv_cache_dtype.startswith("fp8") else torch.float32
        kv_cache = torch.zeros(4, 4, L + R, dtype=dtype)
        md = types.SimpleNamespace(num_actual_tokens=T, num_decode_tokens=T)
        lookups = []

        def get_attention_context(name):
            lookups.append(name)
            return md, layer, kv_cache, torch.arange(T)

        monkeypatch.setattr(vllm_compat, "_mla_attention_cls", lambda: FakeMLA)
        monkeypatch.setattr(vllm_compat, "_get_attention_context", lambda: get_attention_context)
        monkeypatch.setattr(fc, "is_forward_context_available", lambda: True)
        monkeypatch.setattr(fc, "get_forward_context",
                            lambda: types.SimpleNamespace(no_compile_layers={NAME: layer}))
        made.update(layer=layer, lookups=lookups, kv_cache=kv_cache)
        return made

    resolver = vllm_compat.VllmLayerResolver()
    layers.add_resolver(resolver)
    yield make
    layers.remove_resolver(resolver)


def test_attention_looks_layer_state_up_once(vllm_layer):
    """The prepped-q attention used to resolve its layer twice per call (resolver, then the forward context again)."""
    v = vllm_layer("auto")
    T = 3
    q = torch.randn(T, H, P + R)
    q_prepped = torch.randn(T, H, L + R)
    output = torch.full((T, H * V), 7.0)
    torch.ops.mla_passes.mla_attention_with_prepped_q(q, q_prepped, torch.randn(T, L), torch.randn(T, 1, R),
                                                      output, LayerName(NAME))
    assert v["lookups"] == [NAME]
    assert isinstance(v["layer"].impl.mqa_q, torch.Tensor) and torch.equal(v["layer"].impl.mqa_q, q_prepped)
    assert torch.equal(output, torch.ones(T, H * V))


def test_fp8_cache_decided_by_the_kernels_test(vllm_layer):
    """An 'fp8' layer gets a uint8 cache view and a q_scale; the decision is kernels.fp8.is_fp8_kv_cache."""
    vllm_layer("fp8")
    state = layers.resolve_layer(NAME)
    assert state.kv_cache.dtype == torch.uint8
    assert state.q_scale is not None and state.q_scale.shape == (1,)
    assert state.kv_cache_dtype == "fp8"


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e5m2", "fp8_ds_mla", "bfloat16"])
def test_unsupported_kv_cache_dtype_is_refused_by_name(vllm_layer, kv_cache_dtype):
    """A cache dtype the kernels cannot write (vLLM calls fp8_e5m2 'quantized' too) is refused with its name."""
    vllm_layer(kv_cache_dtype)
    with pytest.raises(NotImplementedError, match=f"kv_cache_dtype '{kv_cache_dtype}'"):
        layers.resolve_layer(NAME)


# --- layouts vLLM 0.34 added, refused by name -------------------------------------------

@pytest.mark.parametrize("attr, value, named, cache", [
    ("use_shardq", True, "ShardQ", "fp8_ds_mla"),  # as 0.34 builds it: a sparse layer, named ShardQ first
    ("kv_sharing_target_layer_name", "model.layers.1.self_attn.attn", "KV-cache sharing", "auto"),
])
def test_vllm034_layouts_refused_by_name_at_run_time(vllm_layer, attr, value, named, cache):
    """vLLM 0.34's ShardQ and MLA KV sharing: the resolver names the layout instead of running a wrong attention."""
    v = vllm_layer(cache)
    v["layer"].impl.is_sparse = cache == "fp8_ds_mla"
    setattr(v["layer"], attr, value)
    with pytest.raises(layers.UnsupportedLayer, match=named):
        layers.resolve_layer(NAME)


def test_shardq_layer_left_to_vllm_at_compile_time(vllm_layer, monkeypatch, caplog):
    """At compile time a ShardQ layer is refused by name (the layer stays vLLM's), with one warning, no exception."""
    import logging

    import vllm.config
    import vllm.forward_context as fc

    from mla_passes.passes.attention import layer_state_for
    from mla_passes.passes.lift import MLADecodeQPrepLiftPass

    layer = vllm_layer("auto")["layer"]
    layer.use_shardq = True
    monkeypatch.setattr(fc, "is_forward_context_available", lambda: False)
    static = types.SimpleNamespace(compilation_config=types.SimpleNamespace(static_forward_context={NAME: layer}))
    monkeypatch.setattr(vllm.config, "get_current_vllm_config", lambda: static)
    vllm_compat._warn_refused.cache_clear()
    lift = MLADecodeQPrepLiftPass()
    with caplog.at_level(logging.WARNING, logger="mla_passes"):
        logging.getLogger("mla_passes").addHandler(caplog.handler)
        try:
            assert layer_state_for(lift, LayerName(NAME), f"attention ({NAME})") is None
        finally:
            logging.getLogger("mla_passes").removeHandler(caplog.handler)
    assert len(lift.refusals) == 1 and "ShardQ" in lift.refusals[0] and "left to vLLM" in lift.refusals[0]
    assert any("ShardQ" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_adapter_refuses_a_shardq_step(vllm_layer):
    """A step whose metadata carries a ShardQ split never reaches forward_mqa with our q."""
    v = vllm_layer("auto")
    T = 3
    md = types.SimpleNamespace(num_actual_tokens=T, num_decode_tokens=T, shardq=object())
    with pytest.raises(layers.UnsupportedLayer, match="ShardQ"):
        vllm_compat.attention_with_prepped_q(NAME, torch.randn(T, H, P + R), torch.randn(T, H, L + R),
                                             torch.randn(T, L), torch.randn(T, 1, R), torch.empty(T, H * V),
                                             context=(md, v["layer"], v["kv_cache"]))
    assert v["layer"].impl.mqa_q is None
