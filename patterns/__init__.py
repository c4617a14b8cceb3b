"""FX patterns the mla-passes passes match, one module per rewrite.

Installed as ``mla_passes.patterns`` (the top-level name ``patterns`` is taken
on PyPI).

* :mod:`.q_prep_lift` - the decode q-prep lift (``MLADecodeQPrepLiftPass``):
  the attention anchor;
* :mod:`.qk_rope_kvcache` - the QK-RoPE / KV-cache / q-prep fusion
  (``MLAQkRopeKVCacheFusionPass``): anchors, q scatters, the RoPE forms vLLM
  traces (GPT-J / NeoX, native / DeepSeek-scaling);
* :mod:`.rope` - the semantic RoPE check, the fallback for a RoPE no
  registered pattern covers;
* :mod:`.casts` - which dtype casts in a RoPE the fusion may leave out;
* :mod:`._engine` - registering Inductor patterns whose matches feed a plan.

Every pattern is an Inductor pattern-matcher expression registered (once per
process, lazily) into a ``PatternMatcherPass``; :func:`registered_patterns`
lists them for ``mla-passes patterns``.
"""

from __future__ import annotations

import importlib

from mla_passes.op_handles import op_handles

from . import q_prep_lift, qk_rope_kvcache

PATTERN_MODULES = ("_engine", "casts", "q_prep_lift", "qk_rope_kvcache", "rope")


def pattern_modules() -> list:
    return [importlib.import_module(f"{__name__}.{m}") for m in PATTERN_MODULES]


def pattern_sets() -> list:
    """The registered pattern sets for the ops known now (stand-ins, plus vLLM's once loaded)."""
    h = op_handles()
    return [q_prep_lift.patterns_for(h), qk_rope_kvcache.patterns_for(h)]


def registered_patterns() -> list:
    """Every registered pattern (name, module, doc, variants), per pass."""
    return [(ps.pm_pass.pass_name, reg) for ps in pattern_sets() for reg in ps.registered.values()]
