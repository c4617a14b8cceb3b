"""The benchmarks a user runs: ``mla-passes bench`` (:mod:`.kernel`, the fused kernel
against the chain it replaces), ``mla-passes bench-step`` (:mod:`.step`, a DeepSeek-V3
decode step with the passes off and on) and ``python -m mla_passes.bench.passes``
(the pass manager's own time). Nothing in the core imports this package."""
