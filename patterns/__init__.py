"""FX patterns the mla-passes passes match, one module per rewrite.

Installed as ``mla_passes.patterns`` (the top-level name ``patterns`` is taken
on PyPI).
"""
