"""User configuration of the mla-passes passes (DESIGN §4.4).

``fuse_aiter_qk_rope_kvcache_mla`` turns the passes on: the QK-RoPE /
KV-cache / q-absorb / q-cat / q-quant fusion, then the decode q-prep lift for
any attention the fusion did not take. It implies the RoPE/KV-cache
prerequisite ``fuse_rope_kvcache_cat_mla`` (logged once when that was left
unset; an explicit ``False`` keeps the fusion to graphs that already hold the
fused-rope form and leaves raw-RoPE layers to the lift).

:class:`PassConfig` is typed and checked when built, as vLLM's own
``PassConfig`` is: a field of the wrong type or out of range raises
:class:`PassConfigError` naming the field and what was expected. No
coercion: ``"no"`` is not a bool, ``True`` is not a token count.

Gating (which graphs the passes touch: the decode-bucket threshold, compile
ranges, ``no_range_policy``) lives in :mod:`mla_passes.gating`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass

from .gating import NO_RANGE_POLICIES, decode_threshold
from .kernels.backends import CHOICES as BACKENDS  # "auto" and the backend table's names

logger = logging.getLogger(__name__)


class PassConfigError(TypeError, ValueError):
    """A configuration value of the wrong type or out of range. Both a
    ``TypeError`` and a ``ValueError``, so either ``except`` catches it."""


def _check_bool(owner: str, name: str, value, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, bool):
        expected = "a bool or None" if optional else "a bool"
        raise PassConfigError(f"{owner}: argument {name!r} must be {expected}, got {value!r}")


def check_int(owner: str, name: str, value, *, minimum: int, optional: bool = False) -> None:
    """Raise :class:`PassConfigError` unless ``value`` is an int ``>= minimum``
    (a bool is not an int here), or None when ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        expected = f"an int >= {minimum}" + (" or None" if optional else "")
        raise PassConfigError(f"{owner}: argument {name!r} must be {expected}, got {value!r}")
    if value < minimum:
        raise PassConfigError(f"{owner}: argument {name!r} must be >= {minimum}, got {value!r}")


def _check_choice(owner: str, name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise PassConfigError(f"{owner}: argument {name!r} must be one of {choices}, got {value!r}")


@dataclass
class PassConfig:
    """The passes' options (see the module doc); checked on construction."""

    fuse_aiter_qk_rope_kvcache_mla: bool = False
    fuse_rope_kvcache_cat_mla: bool | None = None
    aiter_qk_rope_kvcache_fusion_max_token_num: int | None = None
    backend: str = "auto"
    # beyond DESIGN §4.4 (keyword-only extensions, defaults keep §4.4 behaviour)
    lift_q_prep: bool = True
    no_range_policy: str = "infer"

    def __post_init__(self) -> None:
        self.validate()
        if self.fuse_aiter_qk_rope_kvcache_mla and self.fuse_rope_kvcache_cat_mla is None:
            logger.info("mla-passes: fuse_aiter_qk_rope_kvcache_mla=True turns on fuse_rope_kvcache_cat_mla")
            self.fuse_rope_kvcache_cat_mla = True

    def validate(self) -> None:
        """Raise :class:`PassConfigError` for a field of the wrong type or out of range."""
        owner = "PassConfig"
        _check_bool(owner, "fuse_aiter_qk_rope_kvcache_mla", self.fuse_aiter_qk_rope_kvcache_mla)
        _check_bool(owner, "fuse_rope_kvcache_cat_mla", self.fuse_rope_kvcache_cat_mla, optional=True)
        check_int(owner, "aiter_qk_rope_kvcache_fusion_max_token_num",
                  self.aiter_qk_rope_kvcache_fusion_max_token_num, minimum=1, optional=True)
        _check_choice(owner, "backend", self.backend, BACKENDS)
        _check_bool(owner, "lift_q_prep", self.lift_q_prep)
        _check_choice(owner, "no_range_policy", self.no_range_policy, NO_RANGE_POLICIES)

    @classmethod
    def from_dict(cls, values: dict) -> "PassConfig":
        """A config from a mapping (e.g. vLLM's ``pass_config``); an unknown key is an error."""
        if not isinstance(values, dict):
            raise PassConfigError(f"PassConfig.from_dict: argument 'values' must be a dict, got {values!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PassConfigError(f"PassConfig: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def decode_max_tokens(self, max_num_seqs: int | None, num_speculative_tokens: int = 0) -> int | None:
        """The decode-bucket threshold (DESIGN §4.3), or None when unknown
        (:func:`mla_passes.gating.decode_threshold`)."""
        return decode_threshold(max_num_seqs, num_speculative_tokens, self.aiter_qk_rope_kvcache_fusion_max_token_num)

    def as_dict(self) -> dict:
        return asdict(self)
