"""The arguments of the fused MLA decode prep, described once (DESIGN §4.1).

:func:`mla_passes.kernels.fused_decode_prep` takes these 13 arguments in this
order, then ``backend=``; :func:`.validate.check_fused_decode_prep_args`
checks them (the rules behind each ``expected`` below); every backend of
:mod:`.backends` takes them in the same order followed by ``dims`` (the
:class:`.validate.PrepDims` the check returned); so does
:func:`.triton_prep.launch`, and :class:`mla_passes.testing.cases.DecodePrepCase`
holds them as fields. ``tests/test_kernel_signature.py`` holds each of those
to :data:`ARG_NAMES`, so this list and the code cannot drift apart.

Sizes: T tokens, H heads, P the no-rope and R the (even) rope width of a q
head, L the latent (kv_c) width.
"""

from __future__ import annotations

from typing import NamedTuple


class Arg(NamedTuple):
    name: str
    shape: str
    dtypes: str
    meaning: str
    written: bool = False  # does the call write it (in place)?


ARGS: tuple[Arg, ...] = (
    Arg("q", "[T, H, P+R]", "bf16/fp16/fp32",
        "the queries: P no-rope columns, then R rope columns (those rotated in place)", written=True),
    Arg("kv_c", "[T, L]", "bf16/fp16/fp32", "the compressed latent kv of each token"),
    Arg("k_pe", "[T, R] or [T, 1, R]", "bf16/fp16/fp32", "the rope part of each token's key (rotated in place)",
        written=True),
    Arg("w_uk_t", "[H, P, L]", "bf16/fp16/fp32", "the absorbed up-projection: q_nope @ w_uk_t[h] per head"),
    Arg("positions", "[T]", "int32/int64", "each token's position, a row of cos_sin_cache"),
    Arg("cos_sin_cache", "[max_pos, R]", "floating", "the rotary table: cos in the first R/2 columns, sin after"),
    Arg("is_neox", "-", "bool", "NeoX pairing (i with i+R/2) when True, GPT-J (2i with 2i+1) when False"),
    Arg("slot_mapping", "[T]", "int32/int64",
        "each token's cache row (block * block_size + offset); negative = padding, no write"),
    Arg("kv_cache", "[num_blocks, block_size, L+R]", "model dtype, or uint8/fp8 when kv_cache_dtype is fp8",
        "the paged cache; row slot_mapping[t] gets [kv_c[t] | rope(k_pe[t])]", written=True),
    Arg("kv_cache_dtype", "-", "str", "'auto' (the cache holds the model dtype) or an fp8 name ('fp8', ...)"),
    Arg("k_scale", "[1]", "float32", "the cache's static fp8 scale (read only for an fp8 cache)"),
    Arg("q_scale", "[1] or None", "float32", "q_out's static fp8 scale; None keeps q_out in q's dtype"),
    Arg("q_out", "[T, H, L+R]", "q's dtype, or fp8 when q_scale is given",
        "the prepped q: [q_nope @ w_uk_t | rope(q_pe)], quantized with q_scale", written=True),
)

ARG_NAMES: tuple[str, ...] = tuple(a.name for a in ARGS)
