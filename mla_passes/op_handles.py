"""The one place the passes get the op overloads they match.

Every pass asks :func:`op_handles` for the overloads that play three roles:
the MLA attention, the KV-cache update and vLLM's fused RoPE + cache update.
vLLM's own ops (named in :mod:`mla_passes.vllm.tables`) fill the roles once
vLLM has registered them in this process; vLLM is never imported here (that costs seconds): a graph can only hold
vLLM's ops once vLLM is loaded, so looking them up in the dispatcher is
enough.

Graphs built without vLLM (tests, the demo, the benchmarks) use ops with
vLLM's schemas from :mod:`mla_passes.testing.standins`; that module adds them
to the roles with :func:`register_role` when it is imported. Runtime code
never imports it, so a vLLM process only ever sees ``mla_passes::`` ops of
ours.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .vllm import tables as vllm_tables

ROLES = ("attention", "kv_cache_update", "fused_rope")


@dataclass(frozen=True)
class MLAOpHandles:
    """Overload sets, one per role."""

    attention: frozenset
    kv_cache_update: frozenset
    fused_rope: frozenset

    @property
    def vllm_loaded(self) -> bool:
        return any(getattr(op, "namespace", "") == "vllm" for op in self.attention)


_registered: dict[str, set] = {role: set() for role in ROLES}
_cache: dict[bool, MLAOpHandles] = {}


def register_role(role: str, overload: torch._ops.OpOverload) -> None:
    """Have the passes treat ``overload`` as playing ``role`` (one of
    :data:`ROLES`), next to vLLM's op for it. The overload must have the
    schema of vLLM's op for that role. Idempotent."""
    if role not in _registered:
        raise ValueError(f"register_role: argument 'role' must be one of {ROLES}, got {role!r}")
    if not isinstance(overload, torch._ops.OpOverload):
        raise TypeError(f"register_role: argument 'overload' must be an OpOverload, got {type(overload).__name__}")
    if overload not in _registered[role]:
        _registered[role].add(overload)
        _cache.clear()


def _lookup(namespace: str, name: str):
    try:
        packet = getattr(getattr(torch.ops, namespace), name)
        return packet.default
    except (AttributeError, RuntimeError):
        return None


def op_handles() -> MLAOpHandles:
    """The overloads to match now (registered roles, plus vLLM's once vLLM is loaded)."""
    key = "vllm" in sys.modules
    cached = _cache.get(key)
    if cached is not None:
        return cached
    sets = {}
    complete = True
    for role in ROLES:
        found = set(_registered[role])
        if key:
            ops = [op for ns, name in vllm_tables.op_names(role) if (op := _lookup(ns, name)) is not None]
            if not ops:
                complete = False  # not registered yet (module not imported): look again next time
            found.update(ops)
        sets[role] = frozenset(found)
    handles = MLAOpHandles(**sets)
    if complete:
        _cache[key] = handles
    return handles


def describe() -> list[str]:
    """Printable names of the matched overloads (for logs, uuid and tools)."""
    h = op_handles()
    return sorted(f"{role}:{op}" for role in ROLES for op in getattr(h, role))
