"""The custom ops: invariant 1 (fake shape == real shape), numbers, mutation table."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mla_passes  # noqa: F401  (registers torch.ops.mla_passes)
from mla_passes.kernels import fused_decode_prep
from mla_passes.layers import MLALayerState, local_layers, resolve_layer
from mla_passes.ops import LayerName, define_op
from mla_passes.testing import make_case

ops = torch.ops.mla_passes


@pytest.fixture
def layer():
    """Registers a layer 'model.layers.0.attn' backed by a random fp8 case."""
    name = "model.layers.0.attn"

    def make(T, q_fp8=True):
        case = make_case(T, 8, P=32, L=64, R=16, block_size=16, kv_cache_dtype="fp8",
                         q_fp8_dtype=torch.float8_e4m3fn if q_fp8 else None, seed=T)
        local_layers.register(name, MLALayerState(
            w_uk_t=case.w_uk_t, kv_cache=case.kv_cache, slot_mapping=case.slot_mapping,
            kv_cache_dtype="fp8", k_scale=case.k_scale, q_scale=case.q_scale,
            q_fp8_dtype=torch.float8_e4m3fn if q_fp8 else None,
        ))
        return case, LayerName(name)

    yield make
    local_layers.unregister(name)


def _fake_of(fn, *args):
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        return fn(*fake_args)


@pytest.mark.parametrize("T", [1, 16, 64, 256])
@pytest.mark.parametrize("q_fp8", [True, False])
def test_decode_q_prep_fake_matches_real(layer, T, q_fp8):
    """mla_decode_q_prep: fake shape/dtype == real for every T; every row computed."""
    case, ln = layer(T, q_fp8)
    out_dtype = torch.float8_e4m3fn if q_fp8 else case.q.dtype
    args = (case.q, ln, 64, 16, out_dtype)
    real = ops.mla_decode_q_prep(*args)
    fake = _fake_of(ops.mla_decode_q_prep, *args)
    assert (fake.shape, fake.dtype) == (real.shape, real.dtype) == ((T, 8, 80), out_dtype)
    # numbers: the fused kernel with an identity rotation (cos=1, sin=0) computes the
    # same absorb + concat + quant
    ref = case.clone()
    R2 = ref.cos_sin_cache.shape[1] // 2
    ref.cos_sin_cache = torch.cat((torch.ones_like(ref.cos_sin_cache[:, :R2]), torch.zeros_like(ref.cos_sin_cache[:, R2:])), -1)
    ref.q_scale = ref.q_scale if q_fp8 else None
    q_out = torch.empty_like(real)
    fused_decode_prep(*ref.kernel_args()[:-1], q_out, backend="reference")
    assert torch.equal(real.view(torch.uint8), q_out.view(torch.uint8))


@pytest.mark.parametrize("T", [1, 16, 64, 256])
def test_fused_decode_prep_fake_matches_real(layer, T):
    """mla_fused_decode_prep: fake shape == real; q/k_pe rotated in place; cache written."""
    case, ln = layer(T)
    expect = case.clone()
    fused_decode_prep(*expect.kernel_args(), backend="reference")
    args = (case.q, case.kv_c, case.k_pe, case.positions, case.cos_sin_cache, case.is_neox, ln,
            torch.float8_e4m3fn, "reference")
    fake = _fake_of(ops.mla_fused_decode_prep, *args)
    real = ops.mla_fused_decode_prep(*args)
    assert (fake.shape, fake.dtype) == (real.shape, real.dtype) == ((T, 8, 80), torch.float8_e4m3fn)
    state = resolve_layer(ln)
    assert torch.equal(real.view(torch.uint8), expect.q_out.view(torch.uint8))
    assert torch.equal(case.q, expect.q) and torch.equal(case.k_pe, expect.k_pe)
    assert torch.equal(state.kv_cache, expect.kv_cache)


def test_out_dtype_mismatch_is_reported(layer):
    """Asking for a bf16 prepped q from a layer that quantizes q is an error."""
    case, ln = layer(4, q_fp8=True)
    with pytest.raises(ValueError, match="out_dtype"):
        ops.mla_decode_q_prep(case.q, ln, 64, 16, torch.bfloat16)


def test_unknown_layer_is_reported():
    with pytest.raises(KeyError, match="no state for MLA layer 'nope'"):
        ops.mla_decode_q_prep(torch.randn(1, 2, 48), LayerName("nope"), 64, 16, torch.float32)


_SCHEMAS = {  # what the passes emit: names, argument names/order and what each op writes must not drift
    "mla_decode_q_prep": "mla_passes::mla_decode_q_prep(Tensor q, {LN} layer_name, int kv_lora_rank, "
                         "int qk_rope_head_dim, ScalarType out_dtype) -> Tensor",
    "mla_fused_decode_prep": "mla_passes::mla_fused_decode_prep(Tensor(a!) q, Tensor kv_c, Tensor(b!) k_pe, "
                             "Tensor positions, Tensor cos_sin_cache, bool is_neox, {LN} layer_name, "
                             "ScalarType out_dtype, str backend, str? kv_cache_dtype=None, Tensor? k_scale=None) -> Tensor",
    "mla_attention_with_prepped_q": "mla_passes::mla_attention_with_prepped_q(Tensor q, Tensor q_prepped, "
                                    "Tensor kv_c_normed, Tensor k_pe, Tensor(a!) output, {LN} layer_name, "
                                    "Tensor? kv_cache_dummy_dep=None) -> ()",
}


@pytest.mark.parametrize("name", sorted(_SCHEMAS))
def test_registered_schemas(name):
    """The registered schemas are the ones the passes emit (the OP_SPECS table this replaces was read by nothing)."""
    op = getattr(ops, name).default
    assert str(op._schema) == _SCHEMAS[name].format(LN="PyObject")  # how torch prints an opaque type
    assert op.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeExplicitAutograd)


def test_define_op_rejects_mutates_that_disagree_with_the_schema():
    """A contract whose mutated arguments differ from the schema's marks is refused at definition."""
    lib = torch.library.Library("mla_passes_test_define", "DEF")
    try:
        with pytest.raises(AssertionError, match=r"mutates=\[\] but the schema writes \['x'\]"):
            define_op(lib, "f", "(Tensor(a!) x) -> ()", mutates=(), impl=lambda x: None, fake=lambda x: None)
    finally:
        lib._destroy()


def test_layer_name_accepts_strings_and_vllm_style_objects():
    from mla_passes.layers import layer_name_str

    class Other:  # vLLM's LayerName has the same .value attribute
        value = "x"

    assert layer_name_str("a") == "a"
    assert layer_name_str(LayerName("b")) == "b"
    assert layer_name_str(Other()) == "x"
    with pytest.raises(TypeError, match="layer_name"):
        layer_name_str(3)


@pytest.mark.parametrize("extra", [-2, 3])
def test_fused_op_slot_mapping_longer_or_shorter_than_T(layer, extra):
    """vLLM pads slot mappings: a longer one is cut to T, a shorter one padded with -1."""
    T = 6
    case, ln = layer(T)
    state = resolve_layer(ln)
    expect = case.clone()
    if extra > 0:
        state.slot_mapping = torch.cat((case.slot_mapping, torch.arange(extra) + 1000))
    else:
        state.slot_mapping = case.slot_mapping[:T + extra]
        expect.slot_mapping = torch.cat((case.slot_mapping[:T + extra], torch.full((-extra,), -1)))
    fused_decode_prep(*expect.kernel_args(), backend="reference")
    out = ops.mla_fused_decode_prep(case.q, case.kv_c, case.k_pe, case.positions, case.cos_sin_cache,
                                    case.is_neox, ln, torch.float8_e4m3fn, "reference")
    assert torch.equal(state.kv_cache.view(torch.uint8), expect.kv_cache.view(torch.uint8))
    assert torch.equal(out.view(torch.uint8), expect.q_out.view(torch.uint8))


_REGISTERED_OPS_PROBE = """
import sys, torch
import {module}
if {uuid}:  # the pass manager's uuid hashes the pattern modules: importing them must not register test ops
    from mla_passes import MLAPassManager, PassConfig
    MLAPassManager(PassConfig(fuse_aiter_qk_rope_kvcache_mla=True), max_num_seqs=4).uuid()
ours = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mla_passes")]
from mla_passes.op_handles import describe
print(sorted(ours)); print(describe())
print(sorted(m for m in sys.modules if m.startswith("mla_passes.testing")))
"""


@pytest.mark.parametrize("module,uuid", [("mla_passes", False), ("mla_passes.vllm.plugin", False),
                                         ("mla_passes", True)])
def test_import_registers_only_our_ops(module, uuid):
    """`import mla_passes` used to register the mla_passes_standin test ops in every vLLM process."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _REGISTERED_OPS_PROBE.format(module=module, uuid=uuid)],
                         capture_output=True, text=True, timeout=120, check=True).stdout.splitlines()
    ours, roles, testing_modules = eval(out[0]), eval(out[1]), eval(out[2])
    assert ours == sorted(f"mla_passes::{n}" for n in
                          ("mla_attention_with_prepped_q", "mla_decode_q_prep", "mla_fused_decode_prep"))
    assert roles == [] and testing_modules == []


def test_standins_register_their_roles():
    """Importing the stand-ins is what puts them into the overload sets the passes match."""
    from mla_passes.op_handles import op_handles
    from mla_passes.testing import standins

    h = op_handles()
    assert standins.attention_with_output in h.attention
    assert standins.kv_cache_update in h.kv_cache_update
    assert standins.fused_rope_kv_cache_update in h.fused_rope
