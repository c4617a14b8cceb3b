"""What every mla-passes graph pass shares: a name, the count of the last
call, debug logging of matches and refusals, and the sources its uuid hashes."""

from __future__ import annotations

import logging

from torch.fx import Graph

logger = logging.getLogger("mla_passes.passes")


class MLAGraphPass:
    """Base of the lift and fusion passes. ``__call__(graph)`` rewrites in
    place and returns the number of layers rewritten (also ``matched_count``)."""

    name: str = "mla_pass"

    def __init__(self, *, backend: str = "auto"):
        self.backend = backend
        self.matched_count = 0
        self.refusals: list[str] = []

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

    def source_modules(self) -> list:
        """Modules whose source changes the rewrite (hashed into the uuid)."""
        import sys

        return [sys.modules[type(self).__module__], sys.modules[__name__]]
