"""What tests, the demo and the benchmarks build on; runtime code never imports it.

* :mod:`.cases` - decode-prep kernel calls with fresh random inputs and
  poisoned outputs, and an independent float64 oracle (re-exported here:
  ``from mla_passes.testing import make_case, oracle, ...``);
* :mod:`.standins` - ops with vLLM's MLA schemas and real math under the
  ``mla_passes_standin`` namespace; importing it registers them and adds them
  to the roles the passes match (:func:`mla_passes.op_handles.register_role`);
* :mod:`.models` - a DeepSeek-style MLA decode stack built from the stand-ins
  (``build_decode_stack``, ``set_step``); imports :mod:`.standins`;
* :mod:`.backend` - ``TestBackend``, a torch.compile backend that runs the
  passes and snapshots the post-grad graph before and after.

Importing this package alone registers no op: the stand-ins come with
:mod:`.standins` or :mod:`.models`.
"""

from __future__ import annotations

from .cases import POISON, DecodePrepCase, Expected, fp8_step, make_case, make_cos_sin_cache, oracle

__all__ = ["POISON", "DecodePrepCase", "Expected", "fp8_step", "make_case", "make_cos_sin_cache", "oracle"]
