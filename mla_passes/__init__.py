"""mla-passes: torch.compile / Inductor passes for the MLA decode step.

See README.md for the user surface and docs/DESIGN.md for the design (code
comments citing "DESIGN §x" refer to it). Importing this package registers
the ``torch.ops.mla_passes`` ops and no other: the stand-ins for vLLM's ops
that tests and the demo use live in :mod:`mla_passes.testing`, which runtime
code never imports.
"""

from __future__ import annotations

from . import kernels, ops
from .config import PassConfig
from .layers import MLALayerState, local_layers
from .ops import LayerName
from .pass_manager import MLAPassManager, compile_range

__version__ = "0.1.0"

__all__ = [
    "LayerName",
    "MLALayerState",
    "MLAPassManager",
    "PassConfig",
    "compile_range",
    "kernels",
    "local_layers",
    "ops",
]
