"""Where an op finds a layer's state from its ``layer_name``.

The ops this library inserts into graphs take a ``layer_name`` (as vLLM's MLA
ops do) and look up everything else a kernel needs - W_UK_T, q_scale, the KV
cache, the slot mapping, the cache dtype and k_scale - at run time through a
chain of resolvers. The chain starts with :data:`local_layers`, a plain
registry that tests, the demo and benchmarks fill; the vLLM plugin appends a
resolver that reads vLLM's forward context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .kernels.fp8 import platform_fp8_dtype


class UnsupportedLayer(NotImplementedError):
    """Raised by a resolver for a layer it knows but whose layout the prepped-q
    path does not cover; the message names the layout. The passes refuse such
    a layer by that name and leave it to vLLM."""


@dataclass
class MLALayerState:
    """What the decode prep of one MLA layer needs besides its activations.

    ``q_scale`` None means the attention backend takes an unquantized q (then
    the prepped q has the model dtype). ``num_decode_tokens`` None means every
    row is a decode row. ``attention_with_prepped_q`` runs the layer's
    attention with an already prepped q for the decode rows (see
    :mod:`mla_passes.ops`). ``attention_backend`` names the backend that runs
    the layer's attention, for records and reports only.
    """

    w_uk_t: torch.Tensor
    kv_cache: torch.Tensor
    slot_mapping: torch.Tensor
    kv_cache_dtype: str = "auto"
    k_scale: torch.Tensor | None = None
    q_scale: torch.Tensor | None = None
    q_fp8_dtype: torch.dtype | None = None
    num_decode_tokens: int | None = None
    attention_with_prepped_q: Callable[..., None] | None = None
    # The attention backend that runs the layer, where the resolver knows it
    # (vLLM: ``layer.attn_backend.get_name()``, e.g. AMX_MLA or CPU_MLA on CPU).
    attention_backend: str | None = None

    def __post_init__(self) -> None:
        if self.k_scale is None:
            self.k_scale = torch.ones(1, dtype=torch.float32, device=self.kv_cache.device)

    @property
    def kv_lora_rank(self) -> int:
        return self.w_uk_t.shape[-1]

    def q_out_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        if self.q_scale is None:
            return model_dtype
        return self.q_fp8_dtype or platform_fp8_dtype(self.w_uk_t.device)


class LayerResolver(Protocol):
    def resolve(self, layer_name: str) -> MLALayerState | None:
        """The state of ``layer_name``, or None if this resolver does not know it."""


class LocalLayerRegistry:
    """A name -> :class:`MLALayerState` map; the first resolver in the chain."""

    def __init__(self) -> None:
        self._layers: dict[str, MLALayerState] = {}

    def register(self, layer_name: str, state: MLALayerState) -> None:
        self._layers[layer_name] = state

    def unregister(self, layer_name: str) -> None:
        self._layers.pop(layer_name, None)

    def clear(self) -> None:
        self._layers.clear()

    def resolve(self, layer_name: str) -> MLALayerState | None:
        return self._layers.get(layer_name)

    def __contains__(self, layer_name: str) -> bool:
        return layer_name in self._layers

    def items(self) -> list[tuple[str, MLALayerState]]:
        """(name, state) of every registered layer."""
        return list(self._layers.items())


local_layers = LocalLayerRegistry()
_resolvers: list[LayerResolver] = [local_layers]


def add_resolver(resolver: LayerResolver) -> None:
    """Append ``resolver`` to the chain (idempotent)."""
    if resolver not in _resolvers:
        _resolvers.append(resolver)


def remove_resolver(resolver: LayerResolver) -> None:
    if resolver is not local_layers and resolver in _resolvers:
        _resolvers.remove(resolver)


def layer_name_str(layer_name: object) -> str:
    """The plain string of a ``layer_name`` op argument (str or an opaque
    LayerName object, ours or vLLM's: anything with a ``value`` str)."""
    if isinstance(layer_name, str):
        return layer_name
    real = getattr(layer_name, "real_obj", None)  # FakeScriptObject at compile time
    if real is not None:
        layer_name = real  # unwrapped once: never recurse on an object's own attributes
        if isinstance(layer_name, str):
            return layer_name
    value = getattr(layer_name, "value", None)
    if isinstance(value, str):
        return value
    raise TypeError(f"argument 'layer_name' must be a str or a LayerName, got {type(layer_name).__name__}")


def resolve_layer(layer_name: object) -> MLALayerState:
    name = layer_name_str(layer_name)
    for resolver in _resolvers:
        state = resolver.resolve(name)
        if state is not None:
            return state
    raise KeyError(
        f"mla-passes: no state for MLA layer {name!r}: register it in "
        "mla_passes.layers.local_layers or run inside vLLM with the mla-passes plugin"
    )
