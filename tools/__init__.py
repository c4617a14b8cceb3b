"""Command-line tools of mla-passes (installed as ``mla_passes.tools``)."""
