"""The one place the passes get the op overloads they match.

Every pass asks :func:`op_handles` for the MLA attention, cache-update,
fused-rope and rotary-embedding overloads. The stand-ins of
:mod:`mla_passes.standins` are always in the sets; vLLM's own ops are added
when vLLM has registered them in this process. vLLM is never imported here
(that costs seconds): a graph can only hold vLLM's ops once vLLM is loaded,
so looking them up in the dispatcher is enough.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from . import standins


@dataclass(frozen=True)
class MLAOpHandles:
    """Overload sets, one per role."""

    attention: frozenset
    kv_cache_update: frozenset
    fused_rope: frozenset
    rotary_embedding: frozenset

    @property
    def vllm_loaded(self) -> bool:
        return any(getattr(op, "namespace", "") == "vllm" for op in self.attention)


_VLLM_OPS = {
    "attention": ("vllm", "unified_mla_attention_with_output"),
    "kv_cache_update": ("vllm", "unified_mla_kv_cache_update"),
    "fused_rope": ("vllm", "fused_rope_unified_mla_kv_cache_update"),
    "rotary_embedding": ("_C", "rotary_embedding"),
}
_STANDINS = {
    "attention": (standins.attention_with_output,),
    "kv_cache_update": (standins.kv_cache_update,),
    "fused_rope": (standins.fused_rope_kv_cache_update,),
    "rotary_embedding": (),
}

_cache: dict[bool, MLAOpHandles] = {}


def _lookup(namespace: str, name: str):
    try:
        packet = getattr(getattr(torch.ops, namespace), name)
        return packet.default
    except (AttributeError, RuntimeError):
        return None


def op_handles() -> MLAOpHandles:
    """The overloads to match now (stand-ins, plus vLLM's once vLLM is loaded)."""
    key = "vllm" in sys.modules
    cached = _cache.get(key)
    if cached is not None:
        return cached
    sets = {}
    complete = True
    for role, ops in _STANDINS.items():
        found = set(ops)
        if key:
            op = _lookup(*_VLLM_OPS[role])
            if op is None:
                complete = False  # not registered yet (module not imported): look again next time
            else:
                found.add(op)
        sets[role] = frozenset(found)
    handles = MLAOpHandles(**sets)
    if complete:
        _cache[key] = handles
    return handles


def describe() -> list[str]:
    """Printable names of the matched overloads (for logs, uuid and tools)."""
    h = op_handles()
    return sorted(f"{role}:{op}" for role in ("attention", "kv_cache_update", "fused_rope", "rotary_embedding")
                  for op in getattr(h, role))
