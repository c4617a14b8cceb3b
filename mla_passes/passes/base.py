"""What every mla-passes graph pass shares: a name, the count of the last
call, the decode-bucket gate it answers ``is_applicable_for_range`` from,
debug logging of refusals, the per-layer guard, and the sources its uuid
hashes.

The per-layer guard (:meth:`MLAGraphPass.guarded`): an unexpected exception
while a pass plans or checks one layer turns into a refusal of that layer,
with a warning naming the layer and the exception, so no bug of ours fails a
user's compile. With ``MLA_PASSES_STRICT=1`` in the environment (the test
suite sets it in ``tests/conftest.py``) the exception is raised instead.
"""

from __future__ import annotations

import logging
import os

from torch.fx import Graph

logger = logging.getLogger(__name__)

STRICT_ENV = "MLA_PASSES_STRICT"


def strict_mode() -> bool:
    """True when ``MLA_PASSES_STRICT`` is set to anything but ``""``/``"0"``: errors raise."""
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


class MLAGraphPass:
    """Base of the lift and fusion passes. ``__call__(graph)`` rewrites in
    place and returns the number of layers rewritten (also ``matched_count``).
    Gating is the caller's (the pass manager asks the gate once per graph);
    ``is_applicable_for_range`` answers from the same gate."""

    name: str = "mla_pass"

    def __init__(self, *, gate=None):
        self.gate = gate
        self.matched_count = 0
        self.refusals: list[str] = []

    def is_applicable_for_range(self, compile_range) -> bool:
        """vLLM's hook: whether this pass applies to ``compile_range`` (its
        :class:`~mla_passes.gating.DecodeGate`; every range without one)."""
        return self.gate is None or self.gate.is_applicable_for_range(compile_range)

    def __call__(self, graph: Graph) -> int:
        self.refusals = []
        self.matched_count = self.apply(graph)
        logger.debug("%s: rewrote %d MLA layer(s)", self.name, self.matched_count)
        return self.matched_count

    def apply(self, graph: Graph) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def refuse(self, where, why: str, *args) -> None:
        """Record and debug-log why a candidate was left alone."""
        msg = why % args if args else why
        self.refusals.append(f"{where}: {msg}")
        logger.debug("%s: not rewriting %s: %s", self.name, where, msg)

    def guarded(self, where: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``; an exception becomes a refusal of ``where``
        (warning) and None, or is raised in strict mode. Only for steps that
        have not changed the graph yet (planning, safety checks)."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a bug of ours must not fail the user's compile
            if strict_mode():
                raise
            msg = f"unexpected {type(e).__name__}: {e}"
            self.refusals.append(f"{where}: {msg}")
            logger.warning("%s: left %s alone after an %s (set %s=1 to raise)", self.name, where, msg, STRICT_ENV)
            return None

    def source_modules(self) -> list:
        """Modules whose source changes the rewrite (hashed into the uuid)."""
        import sys

        return [sys.modules[type(self).__module__], sys.modules[__name__]]
