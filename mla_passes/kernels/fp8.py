"""fp8 helpers shared by every backend.

The platform fp8 flavour is ``float8_e4m3fnuz`` on MI300-class GPUs (gfx94x)
and ``float8_e4m3fn`` everywhere else (DESIGN §4.1). A KV cache stored as
``uint8`` holds fp8 bits of the platform flavour; :func:`as_fp8_cache` views it
(zero-copy) as that dtype.
"""

from __future__ import annotations

import functools

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")
KV_CACHE_DTYPES = ("auto",) + FP8_KV_CACHE_DTYPES


@functools.lru_cache(maxsize=None)
def _gcn_arch(index: int) -> str:
    return getattr(torch.cuda.get_device_properties(index), "gcnArchName", "")


def platform_fp8_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The fp8 dtype the hardware of ``device`` computes in."""
    device = torch.device(device) if device is not None else None
    if (
        torch.version.hip is not None
        and device is not None
        and device.type == "cuda"
        and _gcn_arch(device.index or 0).startswith("gfx94")
    ):
        return torch.float8_e4m3fnuz
    return torch.float8_e4m3fn


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Static per-tensor quant: ``fp8(clamp(x / scale))``, round to nearest even.

    ``x`` is divided in fp32; torch's cast to fp8 rounds to nearest even.
    """
    m = fp8_max(dtype)
    return (x.float() / scale.float()).clamp(-m, m).to(dtype)


def is_fp8_kv_cache(kv_cache_dtype: str) -> bool:
    return kv_cache_dtype in FP8_KV_CACHE_DTYPES


def as_fp8_cache(kv_cache: torch.Tensor) -> torch.Tensor:
    """View a uint8 fp8 cache as the platform fp8 dtype (no copy)."""
    if kv_cache.dtype == torch.uint8:
        return kv_cache.view(platform_fp8_dtype(kv_cache.device))
    return kv_cache
