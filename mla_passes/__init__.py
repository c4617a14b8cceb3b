"""mla-passes: torch.compile / Inductor passes for the MLA decode step.

See README.md for the user surface and DESIGN notes in the repo for the
contracts. Importing this package registers the ``torch.ops.mla_passes`` ops.
"""

from __future__ import annotations

from . import kernels, ops
from .layers import MLALayerState, local_layers
from .ops import LayerName

__version__ = "0.1.0"

__all__ = ["LayerName", "MLALayerState", "kernels", "local_layers", "ops"]

from .config import PassConfig  # noqa: E402
from .pass_manager import MLAPassManager, compile_range  # noqa: E402

__all__ += ["MLAPassManager", "PassConfig", "compile_range"]
