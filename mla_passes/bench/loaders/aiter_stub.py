"""Load AITER's Triton MLA kernel without AITER's package (for ``mla-passes bench``).

``aiter/__init__.py`` needs ROCm (hipconfig, rocminfo, hipcc), but the module
``aiter/ops/triton/fused_kv_cache.py`` is plain Triton and runs on NVIDIA too
(DESIGN §5). This puts empty namespace packages for ``aiter``, ``aiter.ops``,
``aiter.ops.triton`` (and its ``utils`` / ``_triton_kernels``) into
``sys.modules``, pointing at a directory that holds AITER's sources, so that
exactly the kernel modules are imported and nothing else of AITER runs.

Where the sources come from, first found: ``$MLA_PASSES_AITER_SRC``; the
folder ``.whl/aiter_py`` of this checkout (made by :func:`extract_from_wheel`
from an ``amd-aiter`` wheel, ignored by git); an installed ``amd-aiter``.
Nothing of AITER is part of this repository.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import zipfile
from pathlib import Path

# The files the MLA kernel imports (paths inside the wheel / repository).
NEEDED = (
    "aiter/ops/triton/fused_kv_cache.py",
    "aiter/ops/triton/_triton_kernels/fused_kv_cache.py",
    "aiter/ops/triton/rope.py",
    "aiter/ops/triton/_triton_kernels/rope.py",
    "aiter/ops/triton/utils/logger.py",
)
_PACKAGES = ("aiter", "aiter.ops", "aiter.ops.triton", "aiter.ops.triton.utils", "aiter.ops.triton._triton_kernels")
REPO_ROOT = Path(__file__).resolve().parents[3]  # the checkout (mla_passes/bench/loaders/)
DEFAULT_DIR = REPO_ROOT / ".whl" / "aiter_py"


def extract_from_wheel(wheel: str | os.PathLike, dest: str | os.PathLike = DEFAULT_DIR) -> Path:
    """Copy just :data:`NEEDED` out of an ``amd-aiter`` wheel into ``dest``."""
    dest = Path(dest)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name in NEEDED:
            if name not in names:
                raise FileNotFoundError(f"{wheel} has no {name}")
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
    return dest


def _source_root() -> Path | None:
    env = os.environ.get("MLA_PASSES_AITER_SRC")
    candidates = [Path(env)] if env else []
    candidates.append(DEFAULT_DIR)
    spec = importlib.util.find_spec("aiter") if "aiter" not in sys.modules else None
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]).parent)
    for root in candidates:
        if all((root / n).is_file() for n in NEEDED):
            return root
    return None


def load_fused_qk_rope_cat_and_cache_mla():
    """AITER's Triton ``fused_qk_rope_cat_and_cache_mla``, or raise ImportError.

    Installs the stub packages only when no real ``aiter`` is imported yet.
    """
    root = _source_root()
    if root is None:
        raise ImportError(
            "AITER sources not found: set MLA_PASSES_AITER_SRC, or run "
            "`python -m mla_passes.bench.loaders.aiter_stub WHEEL` with an amd-aiter wheel"
        )
    real = sys.modules.get("aiter")
    if real is None or getattr(real, "__mla_passes_stub__", False):
        for name in _PACKAGES:
            if name in sys.modules:
                continue
            mod = types.ModuleType(name)
            mod.__path__ = [str(root / name.replace(".", "/"))]
            mod.__mla_passes_stub__ = True
            sys.modules[name] = mod
    module = importlib.import_module("aiter.ops.triton.fused_kv_cache")
    return module.fused_qk_rope_cat_and_cache_mla


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m mla_passes.bench.loaders.aiter_stub AMD_AITER_WHEEL")
    print(extract_from_wheel(sys.argv[1]))
