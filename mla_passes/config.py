"""User configuration of the mla-passes passes (DESIGN §4.4) and the
decode-bucket gating rules (DESIGN §4.3).

``fuse_aiter_qk_rope_kvcache_mla`` turns the passes on: the QK-RoPE /
KV-cache / q-absorb / q-cat / q-quant fusion, then the decode q-prep lift for
any attention the fusion did not take. It implies the RoPE/KV-cache
prerequisite ``fuse_rope_kvcache_cat_mla`` (logged once when that was left
unset; an explicit ``False`` keeps the fusion to graphs that already hold the
fused-rope form and leaves raw-RoPE layers to the lift).

Gating: the passes apply to a compile range whose end is ``<=``
:meth:`PassConfig.decode_max_tokens` (``aiter_qk_rope_kvcache_fusion_max_token_num``
if set, else ``max_num_seqs * (1 + num_speculative_tokens)``). A graph
compiled with no range information (plain Inductor, or vLLM on CPU where one
dynamic graph serves every batch) follows ``no_range_policy``:

* ``"infer"`` (default): read the token count from the graph: apply when it
  is static and within the bucket, or symbolic with an upper bound within the
  bucket; otherwise leave the graph alone;
* ``"apply"``: always apply (correct for every row by invariant 1; the
  prefill rows then also run the decode q-prep, which costs time);
* ``"skip"``: never apply.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)

NO_RANGE_POLICIES = ("infer", "apply", "skip")
BACKENDS = ("auto", "reference", "triton", "aiter")


@dataclass
class PassConfig:
    fuse_aiter_qk_rope_kvcache_mla: bool = False
    fuse_rope_kvcache_cat_mla: bool | None = None
    aiter_qk_rope_kvcache_fusion_max_token_num: int | None = None
    backend: str = "auto"
    # beyond DESIGN §4.4 (keyword-only extensions, defaults keep §4.4 behaviour)
    lift_q_prep: bool = True
    no_range_policy: str = "infer"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"PassConfig: argument 'backend' must be one of {BACKENDS}, got {self.backend!r}")
        if self.no_range_policy not in NO_RANGE_POLICIES:
            raise ValueError(
                f"PassConfig: argument 'no_range_policy' must be one of {NO_RANGE_POLICIES}, "
                f"got {self.no_range_policy!r}")
        n = self.aiter_qk_rope_kvcache_fusion_max_token_num
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ValueError(
                f"PassConfig: argument 'aiter_qk_rope_kvcache_fusion_max_token_num' must be a positive int "
                f"or None, got {n!r}")
        if self.fuse_aiter_qk_rope_kvcache_mla and self.fuse_rope_kvcache_cat_mla is None:
            logger.info("mla-passes: fuse_aiter_qk_rope_kvcache_mla=True turns on fuse_rope_kvcache_cat_mla")
            self.fuse_rope_kvcache_cat_mla = True

    def decode_max_tokens(self, max_num_seqs: int | None, num_speculative_tokens: int = 0) -> int | None:
        """The decode-bucket threshold (DESIGN §4.3), or None when unknown."""
        if self.aiter_qk_rope_kvcache_fusion_max_token_num is not None:
            return self.aiter_qk_rope_kvcache_fusion_max_token_num
        if max_num_seqs is None:
            return None
        return max_num_seqs * (1 + (num_speculative_tokens or 0))

    def as_dict(self) -> dict:
        return asdict(self)
