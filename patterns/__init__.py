"""FX patterns the mla-passes passes match, one module per rewrite.

Installed as ``mla_passes.patterns`` (the top-level name ``patterns`` is taken
on PyPI).

* :mod:`.q_prep_lift` - the decode q-prep lift (``MLADecodeQPrepLiftPass``);
* :mod:`.qk_rope_kvcache` - the QK-RoPE / KV-cache / q-prep fusion
  (``MLAQkRopeKVCacheFusionPass``), raw and fused-rope forms;
* :mod:`.rope` - semantic RoPE matching used by the fusion's raw form.

:func:`all_patterns` lists every (pattern, replacement) pair as printable FX
code for ``mla-passes patterns``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

PATTERN_MODULES = ("q_prep_lift", "qk_rope_kvcache", "rope")


@dataclass(frozen=True)
class PatternEntry:
    name: str
    module: str
    doc: str
    pattern_code: str
    replacement_code: str


def pattern_modules() -> list:
    return [importlib.import_module(f"{__name__}.{m}") for m in PATTERN_MODULES]


def _code(fn) -> str:
    import torch.fx

    try:
        return torch.fx.symbolic_trace(fn).code.strip()
    except Exception as e:  # noqa: BLE001 - show why rather than fail the listing
        return f"# not traceable: {e}"


def all_patterns() -> list[PatternEntry]:
    """Every registered (pattern, replacement) pair, with FX code."""
    import mla_passes.testing.standins  # noqa: F401  (the pairs are written with the stand-in ops)

    out = []
    for mod in pattern_modules():
        for name, pattern, replacement in getattr(mod, "PATTERNS", ()):
            out.append(PatternEntry(name, mod.__name__, (pattern.__doc__ or "").strip(), _code(pattern),
                                    _code(replacement)))
    return out
