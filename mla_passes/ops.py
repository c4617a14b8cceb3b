"""The custom ops mla-passes puts into graphs: one contract per op.

* ``mla_passes::mla_decode_q_prep`` - the decode q-prep (q-absorb, q-concat,
  q-quant) that vLLM runs inside its opaque attention op, lifted into the
  graph (lift pass). Processes EVERY row of q (invariant 1, DESIGN §4.2).
* ``mla_passes::mla_fused_decode_prep`` - QK-RoPE + KV-cache write + q-prep in
  one op (fusion pass). Rotates ``q[..., P:]`` and ``k_pe`` in place, writes
  the layer's cache, returns the prepped q.
* ``mla_passes::mla_attention_with_prepped_q`` - the layer's attention with
  the decode rows' q already prepped (both passes).

Each op is defined once, in one block below: its schema (argument names,
order and the ``Tensor(a!)`` marks of what it writes), the mutated arguments
(checked against the schema at import), the fake impl and the real impl,
registered through :func:`define_op`. The passes call the ops in place
(defunctionalized) and learn what an op writes from its schema's
``alias_info`` (DESIGN §4.5).

``layer_name`` is an opaque :class:`LayerName` graph input (as vLLM passes it
on torch >= 2.11); everything else about the layer is looked up at run time
through :mod:`mla_passes.layers`. The static facts a fake impl needs for an
exact output shape and dtype (``kv_lora_rank``, ``qk_rope_head_dim``,
``out_dtype``) are op arguments, so fake and real impls agree without any
global state.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

# torch 2.13 has no public API for opaque types (``OpaqueBase``,
# ``register_opaque_type`` and the schema name of a registered type live only
# under ``torch._opaque_base`` / ``torch._library``). This block is the one
# place mla-passes touches them.
from torch._library.opaque_object import get_opaque_type_name, register_opaque_type
from torch._opaque_base import OpaqueBase

from . import kernels
from .kernels.reference import absorb_q_nope, finish_q
from .layers import layer_name_str, resolve_layer


class LayerName(OpaqueBase):
    """A layer name as an opaque, hoisted value object (mirrors vLLM's)."""

    def __init__(self, value: str):
        if not isinstance(value, str):
            raise TypeError(f"LayerName: argument 'value' must be a str, got {type(value).__name__}")
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerName) and other.value == self.value

    def __hash__(self) -> int:
        return hash(("mla_passes.LayerName", self.value))

    def __repr__(self) -> str:
        return f"LayerName({self.value!r})"

    def __fx_repr__(self):
        return (f"LayerName({self.value!r})", {"LayerName": LayerName})


register_opaque_type(LayerName, typ="value", hoist=True)
LAYER_NAME_TYPE = get_opaque_type_name(LayerName)
"""How :class:`LayerName` is spelled in an op schema."""

NAMESPACE = "mla_passes"
_lib = torch.library.Library(NAMESPACE, "DEF")


def define_op(lib: torch.library.Library, name: str, schema: str, *, mutates: Iterable[str],
              impl: Callable, fake: Callable) -> torch._ops.OpOverload:
    """Define ``lib.ns::name`` with ``schema``, its real impl (every device)
    and its fake impl, through the public ``torch.library`` API; ``mutates``
    must name exactly the arguments the schema marks as written.

    Not ``torch.library.custom_op``: its Python autograd and
    ADInplaceOrView wrappers cost about 2.5 us per call more than a plain
    ``define``/``impl`` (3.4 against 0.9 us for a trivial op under
    ``inference_mode`` on the 2-core CPU dev machine), and these ops run
    once per layer per decode step outside CUDA graphs on CPU. vLLM
    registers its own ops the same way.
    """
    qualname = f"{lib.ns}::{name}"
    torch.library.define(qualname, schema, lib=lib)
    overload = getattr(getattr(torch.ops, lib.ns), name).default
    written = {a.name for a in overload._schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    if written != set(mutates):
        raise AssertionError(f"{qualname}: mutates={sorted(mutates)} but the schema writes {sorted(written)}")
    # the run-time impl is never traced by Dynamo (as custom_op arranges): a frame Dynamo
    # skipped at a graph break runs eagerly with Dynamo still active on new frames (issue 11 item 15)
    torch.library.impl(qualname, "CompositeExplicitAutograd", torch.compiler.disable(impl), lib=lib)
    torch.library.register_fake(qualname, fake, lib=lib)
    return overload


def _check_out_dtype(op: str, out_dtype: torch.dtype, state, q: torch.Tensor, layer_name) -> None:
    expected = state.q_out_dtype(q.dtype)
    if out_dtype != expected:
        raise ValueError(
            f"{op}: argument 'out_dtype' is {out_dtype} but layer {layer_name_str(layer_name)!r} "
            f"needs {expected} (q_scale {'set' if state.q_scale is not None else 'None'})"
        )


# --- mla_decode_q_prep -------------------------------------------------------

def _decode_q_prep_out_spec(q, layer_name, kv_lora_rank, qk_rope_head_dim, out_dtype):
    """(like, shape, dtype) of the new output: ``like.new_empty(shape, dtype=dtype)``."""
    return q, (q.shape[0], q.shape[1], kv_lora_rank + qk_rope_head_dim), out_dtype


def _decode_q_prep_fake(q, layer_name, kv_lora_rank, qk_rope_head_dim, out_dtype):
    like, shape, dtype = _decode_q_prep_out_spec(q, layer_name, kv_lora_rank, qk_rope_head_dim, out_dtype)
    return like.new_empty(shape, dtype=dtype)


def _decode_q_prep_impl(q, layer_name, kv_lora_rank, qk_rope_head_dim, out_dtype):
    state = resolve_layer(layer_name)
    H, P, L = state.w_uk_t.shape
    if (L, P + qk_rope_head_dim, H) != (kv_lora_rank, q.shape[-1], q.shape[1]):
        raise ValueError(
            f"mla_decode_q_prep: q {tuple(q.shape)} with kv_lora_rank={kv_lora_rank}, "
            f"qk_rope_head_dim={qk_rope_head_dim} does not fit layer "
            f"{layer_name_str(layer_name)!r} (W_UK_T {tuple(state.w_uk_t.shape)})"
        )
    _check_out_dtype("mla_decode_q_prep", out_dtype, state, q, layer_name)
    q_out = _decode_q_prep_fake(q, layer_name, kv_lora_rank, qk_rope_head_dim, out_dtype)
    rows = _decode_rows(state, q)
    n = q.shape[0] if rows is None else rows
    q_cat = torch.cat((absorb_q_nope(q[:n, :, :P], state.w_uk_t), q[:n, :, P:].float()), dim=-1)
    finish_q(q_cat, state.q_scale, q_out[:n])
    if n < q.shape[0]:
        q_out[n:].zero_()
    return q_out


decode_q_prep_op = define_op(
    _lib, "mla_decode_q_prep",
    f"(Tensor q, {LAYER_NAME_TYPE} layer_name, int kv_lora_rank, int qk_rope_head_dim, ScalarType out_dtype) "
    "-> Tensor",
    mutates=(), impl=_decode_q_prep_impl, fake=_decode_q_prep_fake)


# --- mla_fused_decode_prep ---------------------------------------------------

def _fused_decode_prep_out_spec(q, kv_c, k_pe, positions, cos_sin_cache, is_neox, layer_name, out_dtype, backend,
                                kv_cache_dtype=None, k_scale=None):
    """(like, shape, dtype) of the new output: ``like.new_empty(shape, dtype=dtype)``."""
    return q, (q.shape[0], q.shape[1], kv_c.shape[-1] + k_pe.shape[-1]), out_dtype


def _fused_decode_prep_fake(q, kv_c, k_pe, positions, cos_sin_cache, is_neox, layer_name, out_dtype, backend,
                            kv_cache_dtype=None, k_scale=None):
    like, shape, dtype = _fused_decode_prep_out_spec(q, kv_c, k_pe, positions, cos_sin_cache, is_neox, layer_name,
                                                     out_dtype, backend)
    return like.new_empty(shape, dtype=dtype)


def _slots_for(slot_mapping: torch.Tensor, T: int) -> torch.Tensor:
    """The first ``T`` slots; a shorter mapping (a padded batch) is padded
    with -1 (no cache write), as vLLM pads its own slot mappings."""
    n = slot_mapping.shape[0]
    if n == T:
        return slot_mapping
    if n > T:
        return slot_mapping[:T]
    return torch.cat((slot_mapping, slot_mapping.new_full((T - n,), -1)))


def _decode_rows(state, q: torch.Tensor) -> int | None:
    """On CPU, the number of leading decode rows whose prepped q anyone reads
    (the prepped-q attention sends the other rows to vLLM's prefill path with
    the original q); None: prep every row.

    vLLM on CPU compiles one graph for every batch, so a 2048-token prefill
    step runs the fused op too; absorbing its prefill rows roughly doubles
    the layer's linear work there (``python -m tools.bench_cpu_prefill``).
    The output keeps its shape (invariant 1: fake == real, DESIGN §4.2);
    rows past the decode rows are zero. Never on a GPU: there the op may sit
    in a captured CUDA graph, replayed for batches with another split, so it
    must not branch on this step's metadata."""
    nd = state.num_decode_tokens
    if q.device.type != "cpu" or nd is None or nd >= q.shape[0]:
        return None
    return max(int(nd), 0)


def _fused_decode_prep_impl(q, kv_c, k_pe, positions, cos_sin_cache, is_neox, layer_name, out_dtype, backend,
                            kv_cache_dtype=None, k_scale=None):
    """``kv_cache_dtype`` / ``k_scale``: what the graph's cache update passed
    (the passes always give them); None reads the layer state's."""
    state = resolve_layer(layer_name)
    _check_out_dtype("mla_fused_decode_prep", out_dtype, state, q, layer_name)
    if kv_cache_dtype is not None and kv_cache_dtype != state.kv_cache_dtype:
        raise ValueError(
            f"mla_fused_decode_prep: argument 'kv_cache_dtype' is {kv_cache_dtype!r} but layer "
            f"{layer_name_str(layer_name)!r} holds a {state.kv_cache_dtype!r} cache")
    if k_scale is None:
        k_scale = state.k_scale
    q_out = _fused_decode_prep_fake(q, kv_c, k_pe, positions, cos_sin_cache, is_neox, layer_name, out_dtype, backend)
    args = (q, kv_c, k_pe, state.w_uk_t, positions, cos_sin_cache, is_neox, _slots_for(state.slot_mapping, q.shape[0]),
            state.kv_cache, state.kv_cache_dtype, k_scale, state.q_scale, q_out)
    rows = _decode_rows(state, q)
    if rows is None:
        kernels.fused_decode_prep(*args, backend=backend)
    else:
        kernels.reference.fused_decode_prep_reference(*args, kernels.check_fused_decode_prep_args(*args), q_rows=rows)
    return q_out


fused_decode_prep_op = define_op(
    _lib, "mla_fused_decode_prep",
    f"(Tensor(a!) q, Tensor kv_c, Tensor(b!) k_pe, Tensor positions, Tensor cos_sin_cache, "
    f"bool is_neox, {LAYER_NAME_TYPE} layer_name, ScalarType out_dtype, str backend, "
    "str? kv_cache_dtype=None, Tensor? k_scale=None) -> Tensor",
    mutates=("q", "k_pe"), impl=_fused_decode_prep_impl, fake=_fused_decode_prep_fake)


# --- mla_attention_with_prepped_q --------------------------------------------

def _attention_with_prepped_q_fake(q, q_prepped, kv_c_normed, k_pe, output, layer_name, kv_cache_dummy_dep=None):
    return None


def _attention_with_prepped_q_impl(q, q_prepped, kv_c_normed, k_pe, output, layer_name, kv_cache_dummy_dep=None):
    state = resolve_layer(layer_name)
    if state.attention_with_prepped_q is None:
        raise RuntimeError(
            f"mla_attention_with_prepped_q: layer {layer_name_str(layer_name)!r} has no "
            "attention_with_prepped_q adapter"
        )
    state.attention_with_prepped_q(q, q_prepped, kv_c_normed, k_pe, output)


attention_with_prepped_q_op = define_op(
    _lib, "mla_attention_with_prepped_q",
    f"(Tensor q, Tensor q_prepped, Tensor kv_c_normed, Tensor k_pe, Tensor(a!) output, "
    f"{LAYER_NAME_TYPE} layer_name, Tensor? kv_cache_dummy_dep=None) -> ()",
    mutates=("output",), impl=_attention_with_prepped_q_impl, fake=_attention_with_prepped_q_fake)

