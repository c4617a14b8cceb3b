"""Load vLLM's Triton MLA decode attention kernel without vLLM (for the step benchmark).

``vllm/v1/attention/ops/triton_decode_attention.py`` (``decode_attention_fwd``,
what vLLM's TRITON_MLA backend runs for decode) is one plain Triton file. It
imports only ``vllm.platforms.current_platform`` (for ``is_rocm()``) and
``vllm.triton_utils`` (``tl``, ``triton``). This module puts stand-ins for
those two into ``sys.modules`` under a private package name and imports the
file from a folder outside the repository, so the GPU machine (no vLLM, no
network) runs vLLM's own kernel. Nothing of vLLM is part of this repository.

Where the file comes from, first found: ``$MLA_PASSES_VLLM_MLA_SRC`` (the
file itself); ``.whl/vllm_triton/triton_decode_attention.py`` in this
checkout (ignored by git; :func:`extract` copies it there from an installed
vLLM or a vLLM wheel); an installed vLLM.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import zipfile
from pathlib import Path

INNER = "vllm/v1/attention/ops/triton_decode_attention.py"
REPO_ROOT = Path(__file__).resolve().parents[3]  # the checkout (mla_passes/bench/loaders/)
DEFAULT_FILE = REPO_ROOT / ".whl" / "vllm_triton" / "triton_decode_attention.py"
_PKG = "_mla_passes_vllm_stub"  # never "vllm": a real vLLM may be importable beside it


def extract(source: str | os.PathLike | None = None, dest: str | os.PathLike = DEFAULT_FILE) -> Path:
    """Copy the kernel file from a vLLM wheel (``.whl``), a site-packages
    folder, or (None) the installed vLLM, to ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source is not None and str(source).endswith(".whl"):
        with zipfile.ZipFile(source) as zf:
            dest.write_bytes(zf.read(INNER))
        return dest
    if source is None:
        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("no installed vllm; pass a wheel or a site-packages folder")
        source = Path(list(spec.submodule_search_locations)[0]).parent
    dest.write_bytes((Path(source) / INNER).read_bytes())
    return dest


def _source_file() -> Path | None:
    env = os.environ.get("MLA_PASSES_VLLM_MLA_SRC")
    candidates = [Path(env)] if env else []
    candidates.append(DEFAULT_FILE)
    spec = importlib.util.find_spec("vllm") if "vllm" not in sys.modules else None
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]).parent / INNER)
    return next((p for p in candidates if p.is_file()), None)


class _Platform:
    """What the kernel file asks of ``current_platform``."""

    @staticmethod
    def is_rocm() -> bool:
        import torch

        return torch.version.hip is not None


def load_decode_attention_fwd():
    """vLLM's ``decode_attention_fwd``, or raise ImportError saying what is missing."""
    cached = sys.modules.get(f"{_PKG}.triton_decode_attention")
    if cached is not None:
        return cached.decode_attention_fwd
    path = _source_file()
    if path is None:
        raise ImportError(
            "vLLM's triton_decode_attention.py not found: set MLA_PASSES_VLLM_MLA_SRC, or run "
            "`python -m mla_passes.bench.loaders.vllm_mla_stub [VLLM_WHEEL]` where vLLM is installed")
    import triton
    import triton.language as tl

    platforms = types.ModuleType(f"{_PKG}.platforms")
    platforms.current_platform = _Platform()
    triton_utils = types.ModuleType(f"{_PKG}.triton_utils")
    triton_utils.tl, triton_utils.triton = tl, triton
    saved = {n: sys.modules.get(n) for n in ("vllm", "vllm.platforms", "vllm.triton_utils")}
    root = types.ModuleType(_PKG)
    root.__path__ = []
    sys.modules[_PKG] = root
    try:
        # the file says `from vllm.platforms import ...`: answer with the stand-ins while it imports
        if saved["vllm"] is None:
            stub_vllm = types.ModuleType("vllm")
            stub_vllm.__path__ = []
            sys.modules["vllm"] = stub_vllm
        sys.modules["vllm.platforms"] = platforms
        sys.modules["vllm.triton_utils"] = triton_utils
        spec = importlib.util.spec_from_file_location(f"{_PKG}.triton_decode_attention", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    return module.decode_attention_fwd


if __name__ == "__main__":
    print(extract(sys.argv[1] if len(sys.argv) > 1 else None))
