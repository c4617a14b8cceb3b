"""What mla-passes needs from vLLM's internals, in one place.

Imported only inside vLLM processes (by :mod:`mla_passes.vllm.plugin` once
the flag is on, and by pickled objects in engine-core/worker processes).
It holds

* the version gate (the releases of :mod:`mla_passes.vllm.tables`: vLLM
  0.32, 0.33 and 0.34; anything else is refused at startup with the flag on,
  never run),
* :class:`VllmLayerResolver`, the :mod:`mla_passes.layers` resolver that reads
  a layer's state from vLLM's forward context (or, at compile time, from the
  static forward context),
* :func:`attention_with_prepped_q`, the adapter behind
  ``mla_passes::mla_attention_with_prepped_q``: it mirrors
  ``MLAAttention.forward_impl`` (vLLM 0.32-0.34,
  ``vllm/model_executor/layers/attention/mla_attention.py``) except that the
  decode rows' q-absorb/concat/quant is replaced by the prepped q; the
  layouts it does not mirror are refused by name (:func:`_unsupported`),
* :class:`ComposedPostGradPass`, how our pass manager and a user's own
  post-grad pass share vLLM's single ``post_grad_custom_post_pass`` slot.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
from typing import Any

import torch

from ..gating import vllm_compile_range
from ..kernels.fp8 import KV_CACHE_DTYPES, is_fp8_kv_cache
from ..layers import MLALayerState, UnsupportedLayer, layer_name_str
from ..pass_manager import MLAPassManager
from . import patches
from .tables import INDUCTOR_PASS_MODULES, SUPPORTED_VLLM

logger = logging.getLogger(__name__)  # the mla_passes tree; shown through vLLM's handlers (patches)


# --- version gate ------------------------------------------------------------

def vllm_version() -> tuple[int, int] | None:
    import vllm

    parts = str(getattr(vllm, "__version__", "")).split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def supported_range() -> str:
    """The supported releases in words, e.g. ``0.32, 0.33 or 0.34``."""
    names = ["%d.%d" % v for v in SUPPORTED_VLLM]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _mla_attention_cls():
    from vllm.model_executor.layers.attention.mla_attention import MLAAttention

    return MLAAttention


def _get_attention_context():
    from vllm.model_executor.layers.attention.attention import get_attention_context

    return get_attention_context


def check_supported() -> None:
    """Raise a clear error unless this vLLM has a layout we know (:data:`SUPPORTED_VLLM`)."""
    version = vllm_version()
    if version not in SUPPORTED_VLLM:
        import vllm

        raise RuntimeError(
            f"mla-passes: pass_config.fuse_aiter_qk_rope_kvcache_mla needs vLLM "
            f"{supported_range()}; this is vLLM "
            f"{getattr(vllm, '__version__', '?')}. Turn the flag off or install a supported vLLM."
        )
    missing = []
    try:
        cls = _mla_attention_cls()
        for attr in ("forward_impl", "_v_up_proj"):
            if not hasattr(cls, attr):
                missing.append(f"MLAAttention.{attr}")
        params = inspect.signature(cls.forward_impl).parameters
        for p in ("q", "k_c_normed", "k_pe", "kv_cache", "attn_metadata", "output"):
            if p not in params:
                missing.append(f"MLAAttention.forward_impl({p})")
    except ImportError as e:
        missing.append(f"vllm.model_executor.layers.attention.mla_attention ({e})")
    try:
        _get_attention_context()
    except ImportError as e:
        missing.append(f"get_attention_context ({e})")
    missing += patches.missing_hooks()
    if missing:
        raise RuntimeError(
            f"mla-passes: this vLLM's MLA attention layout is not the one of vLLM {supported_range()} "
            f"(missing: {', '.join(missing)}); refusing to run the MLA fusion."
        )


# --- layer state ---------------------------------------------------------------

def _w_uk_t(layer) -> torch.Tensor | None:
    """``W_UK_T [H, P, L]`` of a layer. vLLM's AMX path keeps only a
    VNNI-packed W_UK (``impl._w_uk_packed``) and drops ``W_UK_T``; then it is
    recovered once with the same ``bmm_cpu`` vLLM absorbs with, applied to an
    identity (exact), and kept on the layer."""
    w = getattr(layer, "W_UK_T", None)
    if w is not None:
        return w
    w = getattr(layer, "_mla_passes_w_uk_t", None)
    if w is not None:
        return w
    impl = layer.impl
    packed = getattr(impl, "_w_uk_packed", None)
    if not getattr(layer, "is_amx_bmm_enabled", False) or packed is None:
        return None
    from vllm import _custom_ops as ops

    H, P, L = layer.num_heads, layer.qk_nope_head_dim, layer.kv_lora_rank
    dtype = packed.dtype if packed.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    eye = torch.eye(P, dtype=dtype, device=packed.device).expand(H, P, P).contiguous()
    w = torch.empty(H, P, L, dtype=dtype, device=packed.device)
    ops.bmm_cpu(w, eye, packed, True, getattr(impl, "_w_scale", None))
    layer._mla_passes_w_uk_t = w
    return w


def _unsupported(layer) -> str | None:
    """Why this layer cannot take a prepped q (None: it can)."""
    impl = layer.impl
    if getattr(layer, "use_shardq", False):
        # vLLM 0.34: q split across TP ranks by tokens (vllm/v1/attention/ops/shardq.py),
        # buffers allocated by the layer; forward_impl reshuffles the prepped q with
        # shard_q/unshard_out around forward_mqa. Our adapter does not mirror that.
        return "ShardQ (use_shardq: q sharded across TP ranks, vllm/v1/attention/ops/shardq.py)"
    if layer.kv_cache_dtype not in KV_CACHE_DTYPES:
        return f"kv_cache_dtype {layer.kv_cache_dtype!r} (supported: {', '.join(KV_CACHE_DTYPES)})"
    if getattr(impl, "is_sparse", False):
        return "sparse MLA"
    if getattr(impl, "dcp_world_size", 1) > 1 or getattr(layer, "use_pcp", False):
        return "decode/prefill context parallelism"
    if getattr(layer, "q_pad_num_heads", None) is not None:
        return "head padding (q_pad_num_heads)"
    if _w_uk_t(layer) is None:
        return "no W_UK_T (fp8/fp4 AITER bmm weights)"
    if getattr(layer, "hisparse_cache", None) is not None:
        return "hisparse cache"
    if getattr(layer, "kv_sharing_target_layer_name", None):
        return "KV-cache sharing"
    return None


def _fp8_dtype() -> torch.dtype:
    """The fp8 dtype vLLM's attention takes for q and views its cache as."""
    from vllm.platforms import current_platform

    return current_platform.fp8_dtype()


def _as_cache_bits(kv_cache: torch.Tensor, kv_cache_dtype: str) -> torch.Tensor:
    """fp8 caches as the uint8 tensor our kernels take (zero-copy)."""
    if is_fp8_kv_cache(kv_cache_dtype) and kv_cache.dtype != torch.uint8:
        return kv_cache.view(torch.uint8)
    return kv_cache


def _backend_name(layer) -> str | None:
    """The name of the attention backend vLLM chose for ``layer`` (on CPU it
    depends on the machine: AMX_MLA with AMX tiles, else CPU_MLA)."""
    try:
        return str(layer.attn_backend.get_name())
    except Exception:
        return None


def _max_step_tokens() -> int:
    try:
        from vllm.config import get_current_vllm_config

        return int(get_current_vllm_config().scheduler_config.max_num_batched_tokens)
    except Exception:
        return 1 << 16


@functools.lru_cache(maxsize=None)
def _warn_refused(why: str) -> None:
    logger.warning("mla-passes: MLA layers that use %s are left to vLLM (not fused); "
                   "the other layers are unaffected", why)


class VllmLayerResolver:
    """Resolves a layer name to :class:`MLALayerState` from vLLM's contexts.

    Inside a forward pass: W_UK_T, q_scale, this step's KV cache and slot
    mapping, kv_cache_dtype, k_scale, num_decode_tokens and the prepped-q
    attention adapter. Outside one (compile time): the same static facts with
    an empty slot mapping, enough for ``q_out_dtype``. vLLM's contexts are
    read once per call: the adapter gets what this lookup found.
    """

    def resolve(self, layer_name: str) -> MLALayerState | None:
        layer, attn_metadata, kv_cache, slot_mapping = self._lookup(layer_name)
        if layer is None:
            return None
        why = _unsupported(layer)
        if why is not None:
            if attn_metadata is None:  # compile time: the passes leave the layer to vLLM
                _warn_refused(why)
            raise UnsupportedLayer(
                f"mla-passes: layer {layer_name!r} uses {why}, which the prepped-q MLA path does not support; "
                "the layer is left to vLLM"
            )
        w_uk_t = _w_uk_t(layer)
        kv_cache_dtype = layer.kv_cache_dtype
        q_scale = None
        if is_fp8_kv_cache(kv_cache_dtype) and getattr(layer.impl, "supports_quant_query_input", False):
            q_scale = layer._q_scale.reshape(1)
        adapter = _Adapter(layer_name, layer, attn_metadata, kv_cache)
        if slot_mapping is None:
            # No cache write this step (vLLM's profile/dummy runs): all slots -1.
            # Sized to the largest step; needs the op to take slot_mapping[:T]
            # (vLLM pads slot mappings the same way).
            slot_mapping = torch.full((_max_step_tokens(),), -1, dtype=torch.int64, device=w_uk_t.device)
        if kv_cache is None or kv_cache.numel() == 0:
            kv_cache = torch.empty((0, 1, layer.kv_lora_rank + layer.qk_rope_head_dim),
                                   dtype=w_uk_t.dtype, device=w_uk_t.device)
        return MLALayerState(
            w_uk_t=w_uk_t,
            kv_cache=_as_cache_bits(kv_cache, kv_cache_dtype),
            slot_mapping=slot_mapping.flatten(),
            kv_cache_dtype=kv_cache_dtype,
            k_scale=layer._k_scale.reshape(1).float(),
            q_scale=q_scale,
            q_fp8_dtype=_fp8_dtype() if q_scale is not None else None,
            num_decode_tokens=getattr(attn_metadata, "num_decode_tokens", None),
            attention_with_prepped_q=adapter,
            attention_backend=_backend_name(layer),
        )

    @staticmethod
    def _lookup(layer_name: str):
        from vllm.forward_context import get_forward_context, is_forward_context_available

        mla_cls = _mla_attention_cls()
        if is_forward_context_available():
            ctx = get_forward_context()
            layer = ctx.no_compile_layers.get(layer_name)
            if not isinstance(layer, mla_cls):
                return None, None, None, None
            attn_metadata, layer, kv_cache, slot_mapping = _get_attention_context()(layer_name)
            return layer, attn_metadata, kv_cache, slot_mapping
        from vllm.config import get_current_vllm_config

        try:
            static = get_current_vllm_config().compilation_config.static_forward_context
        except Exception:
            return None, None, None, None
        layer = static.get(layer_name)
        if not isinstance(layer, mla_cls):
            return None, None, None, None
        return layer, None, getattr(layer, "kv_cache", None), None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VllmLayerResolver)

    def __hash__(self) -> int:
        return hash(VllmLayerResolver)


# --- attention with a prepped q -------------------------------------------------

# Impls whose forward_mqa concatenates a (ql_nope, q_pe) tuple itself: they get
# the prepped q as one tensor (the same values, one copy fewer). Every other impl
# gets the tuple of views, the form vLLM gives it.
_TAKES_CONCAT_Q = frozenset({"CPUMLAImpl", "AMXMLAImpl", "FlashMLAImpl", "TritonMLAImpl"})


class _Adapter:
    """``MLALayerState.attention_with_prepped_q`` for one vLLM layer, bound to
    the layer, attention metadata and cache the resolver already looked up."""

    __slots__ = ("layer_name", "context")

    def __init__(self, layer_name: str, layer, attn_metadata, kv_cache):
        self.layer_name = layer_name
        self.context = (attn_metadata, layer, kv_cache)

    def __call__(self, q, q_prepped, kv_c_normed, k_pe, output) -> None:
        attention_with_prepped_q(self.layer_name, q, q_prepped, kv_c_normed, k_pe, output, context=self.context)


def attention_with_prepped_q(layer_name, q, q_prepped, kv_c_normed, k_pe, output, *, context=None) -> None:
    """vLLM's MLA attention for one layer, decode rows from ``q_prepped``.

    Mirrors ``unified_mla_attention_with_output`` -> ``MLAAttention.forward_impl``
    (0.32-0.34) for the no-output-quant, no-DCP/PCP, non-sparse, no-ShardQ,
    no-KV-sharing case (0.34's ``mqa_q_prepared`` is the passes' business: a
    call that sets it is never rewritten): rows
    ``[num_decode_tokens:num_actual_tokens]`` go to ``impl.forward_mha`` with the
    original ``q``; rows ``[:num_decode_tokens]`` go to ``impl.forward_mqa`` with
    ``q_prepped`` (fp8 concat when vLLM would have quantized, else the form the
    impl takes), then ``layer._v_up_proj``. ``context`` is ``(attn_metadata,
    layer, kv_cache)`` as :class:`VllmLayerResolver` found them (looked up here
    when None); the resolver has already refused an unsupported layer.
    """
    name = layer_name_str(layer_name)
    if context is None:
        attn_metadata, layer, kv_cache, _ = _get_attention_context()(name)
        why = _unsupported(layer)
        if why is not None:
            raise UnsupportedLayer(f"mla-passes: layer {name!r} uses {why}; prepped-q attention unsupported")
    else:
        attn_metadata, layer, kv_cache = context
    if attn_metadata is None:
        # Profile/dummy run: vLLM's own path (it only zero-fills the output).
        layer.forward_impl(q, kv_c_normed, k_pe, kv_cache, attn_metadata, output=output)
        return

    if getattr(attn_metadata, "shardq", None) is not None:
        # vLLM 0.34 sets this only for layers with use_shardq, which the resolver refuses.
        raise UnsupportedLayer(f"mla-passes: layer {name!r}: this step's metadata carries a ShardQ split; "
                               "prepped-q attention unsupported")
    impl = layer.impl
    n = attn_metadata.num_actual_tokens
    output = output[:n]
    q, kv_c_normed, k_pe = q[:n], kv_c_normed[:n], k_pe[:n]
    fp8_attention = is_fp8_kv_cache(layer.kv_cache_dtype)
    if fp8_attention:
        kv_cache = kv_cache.view(_fp8_dtype())

    nd = attn_metadata.num_decode_tokens
    if nd < n:
        impl.forward_mha(
            q[nd:], kv_c_normed[nd:], k_pe[nd:], kv_cache, attn_metadata, layer._k_scale,
            output=output[nd:n], output_scale=None,
        )
    if nd > 0:
        mqa_q = q_prepped[:nd]
        L = layer.kv_lora_rank
        quantized = fp8_attention and getattr(impl, "supports_quant_query_input", False)
        if quantized:
            if mqa_q.dtype != _fp8_dtype():
                raise RuntimeError(f"mla-passes: layer {name!r} takes an fp8 q but the prepped q is {mqa_q.dtype}")
        elif type(impl).__name__ not in _TAKES_CONCAT_Q:
            mqa_q = (mqa_q[..., :L], mqa_q[..., L:])
        attn_out, _lse = impl.forward_mqa(mqa_q, kv_cache, attn_metadata, layer)
        layer._v_up_proj(attn_out, out=output[:nd])


# --- composing with a user's post-grad pass ------------------------------------

def _inductor_pass_base():
    for mod in INDUCTOR_PASS_MODULES:
        try:
            return __import__(mod, fromlist=["InductorPass"]).InductorPass
        except (ImportError, AttributeError):
            continue
    from torch._inductor.custom_graph_pass import CustomGraphPass

    return CustomGraphPass


class ComposedPostGradPass(_inductor_pass_base()):  # type: ignore[misc]
    """Our pass manager, then the user's own post-grad pass, in vLLM's one
    ``post_grad_custom_post_pass`` slot. Each sub-pass is range-gated by its
    own ``is_applicable_for_range`` where vLLM provides a compile range (on
    CPU there is none: one graph serves every batch size, every pass runs)."""

    def __init__(self, passes: list[Any]):
        self.passes = list(passes)

    def __call__(self, graph: torch.fx.Graph) -> None:
        rng = vllm_compile_range()  # the one lookup (mla_passes.gating)
        for p in self.passes:
            gate = getattr(p, "is_applicable_for_range", None)
            if rng is not None and gate is not None and not gate(rng):
                continue
            p(graph)

    def is_applicable_for_range(self, compile_range) -> bool:
        return any(getattr(p, "is_applicable_for_range", lambda r: True)(compile_range) for p in self.passes)

    def uuid(self) -> str:
        h = hashlib.sha256(inspect.getsource(ComposedPostGradPass).encode())
        for p in self.passes:
            u = p.uuid() if hasattr(p, "uuid") else type(p).__qualname__
            h.update(repr(u).encode())
        return h.hexdigest()

    @property
    def user_passes(self) -> list[Any]:
        return [p for p in self.passes if not isinstance(p, MLAPassManager)]
