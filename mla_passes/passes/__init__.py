"""The mla-passes graph passes (see each module's docstring).

* :class:`MLAQkRopeKVCacheFusionPass` - RoPE + KV-cache write + decode q-prep
  into ``mla_passes::mla_fused_decode_prep`` per MLA layer;
* :class:`MLADecodeQPrepLiftPass` - the decode q-prep out of the opaque
  attention op into ``mla_passes::mla_decode_q_prep``.

:class:`mla_passes.MLAPassManager` runs them in that order, gated by compile range.
"""

from .fusion import MLAQkRopeKVCacheFusionPass
from .lift import MLADecodeQPrepLiftPass

__all__ = ["MLADecodeQPrepLiftPass", "MLAQkRopeKVCacheFusionPass"]
