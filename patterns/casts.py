"""Which dtype casts in a RoPE subgraph the fusion may leave out.

The fused op reads q_pe, k_pe and the cos/sin table as they are, computes in
fp32 and rounds once, to the dtype of the memory it rotates in place (q's,
k's: the *stored* dtype). A cast in the matched RoPE is part of the math
unless dropping it changes no result beyond that rounding (DESIGN §3,
"Casts"). :func:`cast_ok` is the one rule, for every edge of the RoPE (its
input, cos/sin, its output): a cast from ``src`` to ``dst`` may be dropped
when

* every value of ``src`` is a value of ``dst`` (:func:`holds`: same dtype, or
  a float ``dst`` with at least ``src``'s precision, range and subnormal
  reach), so the cast changes nothing; or
* ``dst`` holds every stored dtype: the cast then rounds at least as finely
  as the result is stored (``q.float()`` ... ``.to(q.dtype)``; an fp32 table
  read in a bf16 RoPE), one of the roundings the semantic check budgets
  (:data:`.rope.ROUNDINGS`).

Anything else (``q_pe.to(float8_e4m3fn).to(bf16)``, a bf16 round trip in an
fp32 model, cos/sin through fp8 or fp16 in a bf16 model, ``rope(x).to(fp8)``)
is a narrowing the fused op cannot reproduce: the registered patterns stop at
it and the semantic check refuses the layer, naming the cast.

Integer-to-integer casts (positions int32 <-> int64) are index arithmetic and
not judged here; the gather bounds them.
"""

from __future__ import annotations

import torch
from torch.fx import Node

CASTS = (torch.ops.prims.convert_element_type.default, torch.ops.aten._to_copy.default)


def is_cast(n) -> bool:
    return isinstance(n, Node) and n.op == "call_function" and n.target in CASTS


def _dtype(n):
    v = n.meta.get("val") if isinstance(n, Node) else None
    return v.dtype if isinstance(v, torch.Tensor) else None


def holds(dst: torch.dtype, src: torch.dtype) -> bool:
    """Whether every value of ``src`` is exactly a value of ``dst``."""
    if dst == src:
        return True
    if not (dst.is_floating_point and src.is_floating_point):
        return False
    fd, fs = torch.finfo(dst), torch.finfo(src)
    return (fd.eps <= fs.eps and fd.max >= fs.max
            and fd.smallest_normal <= fs.smallest_normal
            and fd.smallest_normal * fd.eps <= fs.smallest_normal * fs.eps)


def cast_dtypes(n: Node):
    """(source dtype, result dtype) of cast node ``n``; None where unknown."""
    return _dtype(n.args[0]) if n.args else None, _dtype(n)


def judged(n: Node) -> bool:
    """Whether the rule applies to cast ``n`` (a float on either side)."""
    src, dst = cast_dtypes(n)
    return src is None or dst is None or src.is_floating_point or dst.is_floating_point


def cast_ok(n: Node, stored) -> bool:
    """Whether the fusion may drop cast ``n`` when the RoPE's results are
    stored in the dtypes ``stored`` (module docstring)."""
    src, dst = cast_dtypes(n)
    if src is None or dst is None:
        return False
    if not judged(n):
        return True
    return holds(dst, src) or (bool(stored) and all(holds(dst, s) for s in stored))


def describe(n: Node) -> str:
    src, dst = cast_dtypes(n)
    s = lambda d: str(d).replace("torch.", "")  # noqa: E731
    return f"{n.name} ({s(src)} -> {s(dst)})"


def strip(n, stored):
    """``n`` without the casts on top of it that :func:`cast_ok` lets go;
    stops at the first one it does not (so a structural check that expects
    the uncast node fails there)."""
    while is_cast(n) and cast_ok(n, stored):
        n = n.args[0]
    return n


def root_dtype(n):
    """The dtype below every cast on top of ``n`` (what a RoPE input was read as)."""
    while is_cast(n):
        n = n.args[0]
    return _dtype(n)
