"""The backends of the fused MLA decode prep: one table (DESIGN §4.1, §4.4).

Each row says what a backend is called, where it can run, where its
implementation lives and which backend runs instead where it cannot. Every
other list of backends derives from :data:`TABLE`:

* :data:`BACKENDS` - the names, in table order (``fused_decode_prep``'s
  ``backend=`` argument, ``PassConfig.backend`` and the CLI's ``--backend``
  add ``"auto"`` in front);
* :data:`AUTO_ORDER` - what ``backend="auto"`` tries, best first: the table
  read from its end (a row is preferred to the rows above it);
* the fallback chain - each row's ``fallback``, followed until a backend is
  available (the last one, ``reference``, always is).

Adding a backend is adding a row here (CONTRIBUTING.md, "Adding a backend").
Every implementation takes the arguments described once in :mod:`.signature`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Backend:
    """One row of the table."""

    name: str
    available: Callable[[torch.device], bool]  # can it run on this device here?
    impl: str  # its implementation, "module:function" in this package (imported on first use)
    fallback: str | None  # the backend that runs instead where it is not available
    doc: str  # one line: what it is


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def triton_available(device: torch.device) -> bool:
    """Our Triton kernels run on CUDA and ROCm devices where triton imports."""
    return device.type == "cuda" and _triton_importable()


def aiter_available(device: torch.device) -> bool:
    """AITER's op runs on ROCm where the ``aiter`` package is installed."""
    if device.type != "cuda" or torch.version.hip is None:
        return False
    return importlib.util.find_spec("aiter") is not None


TABLE: tuple[Backend, ...] = (
    Backend("reference", lambda device: True, ".reference:fused_decode_prep_reference", None,
            "torch ops, any device"),
    Backend("triton", triton_available, ".triton_prep:fused_decode_prep_triton", "reference",
            "one Triton kernel, CUDA and ROCm"),
    Backend("aiter", aiter_available, ".aiter_prep:fused_decode_prep_aiter", "triton",
            "AITER's HIP kernel on ROCm"),
)

BY_NAME: dict[str, Backend] = {b.name: b for b in TABLE}
BACKENDS: tuple[str, ...] = tuple(b.name for b in TABLE)
AUTO_ORDER: tuple[str, ...] = tuple(reversed(BACKENDS))
CHOICES: tuple[str, ...] = ("auto",) + BACKENDS  # what a user may ask for


def first_available(name: str, device: torch.device) -> str:
    """``name`` if it is available on ``device``, else the first available
    backend down its fallback chain."""
    while not BY_NAME[name].available(device):
        name = BY_NAME[name].fallback
    return name


def implementation(name: str) -> Callable:
    """The implementation of backend ``name`` (:mod:`.signature`'s arguments, then ``dims``).

    Imported by its path on first use: ``triton_prep`` imports triton, which
    only loads where that backend runs; and the table sits below the
    implementations (``aiter_prep`` reads its fallback here), so it names
    them instead of importing them."""
    module, _, function = BY_NAME[name].impl.partition(":")
    return getattr(importlib.import_module(module, __package__), function)
