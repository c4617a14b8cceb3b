"""Build and call FlashInfer's fused MLA RoPE + fp8 quant + paged-cache append (for ``mla-passes bench``).

FlashInfer's ``flashinfer.rope.rope_quantize_fp8_append_paged_kv_cache`` is
the closest NVIDIA peer of our fused kernel: one CUDA kernel rotates q_pe and
k_pe, quantizes q (rope and no-rope parts) and the cache row to fp8, and
appends the row to a paged MLA cache; the absorb bmm runs beside it (two
launches). ``import flashinfer`` cannot run on the GPU machine (its package
needs cuda-tile, nccl4py, nvidia-cutlass-dsl, nvidia-cudnn-frontend, and the
wheel is 62 MB, over what a device call may carry), and the kernel itself is
JIT-compiled from the wheel's CUDA sources. So this module:

* :func:`build` compiles exactly that kernel's translation units
  (``data/csrc/rope.cu`` and ``data/csrc/flashinfer_rope_binding.cu`` of a
  ``flashinfer-python`` wheel) with the flags FlashInfer's JIT uses
  (``flashinfer/jit/core.py`` ``gen_jit_spec``, ``cpp_ext.py``) for sm_90a,
  into one shared library under ``.whl/flashinfer_rope`` (ignored by git);
* :func:`load` opens that library through ``tvm_ffi`` (FlashInfer's FFI, the
  ``apache-tvm-ffi`` wheel) and returns its exported
  ``rope_quantize_append_paged_kv_cache``;
* :func:`mla_rope_quantize_append` passes the arguments exactly as the Python
  wrapper does for MLA (2-D K tensors made 3-D, empty GQA caches and V,
  int32 page table), so the kernel that runs is FlashInfer's own.

Nothing of FlashInfer is part of this repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[3]  # the checkout (mla_passes/bench/loaders/)
DEFAULT_DIR = REPO_ROOT / ".whl" / "flashinfer_rope"
LIB_NAME = "flashinfer_rope_sm90a.so"
SOURCES = ("rope.cu", "flashinfer_rope_binding.cu")  # under flashinfer/data/csrc
# FlashInfer's JIT flags for these sources (gen_jit_spec defaults, sm90a_nvcc_flags, cpp_ext.build_cuda_cflags)
NVCC_FLAGS = ("-std=c++17", "-use_fast_math", "-Xfatbin=-compress-all", "--compress-mode=size",
              "-DFLASHINFER_ENABLE_F16", "-DFLASHINFER_ENABLE_BF16", "-DFLASHINFER_ENABLE_FP8_E4M3",
              "-DFLASHINFER_ENABLE_FP8_E5M2", "-DNDEBUG", "-O3", "--compiler-options=-fPIC",
              "--expt-relaxed-constexpr", "-static-global-template-stub=false",
              "-gencode=arch=compute_90a,code=sm_90a", "-DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED",
              "-DFLASHINFER_ENABLE_FP8_E8M0", "-DFLASHINFER_ENABLE_FP4_E2M1")
NHD = 0  # flashinfer.utils.TensorLayout.NHD (ignored for MLA)


def build(wheel: str | os.PathLike, tvm_ffi_root: str | os.PathLike | None = None,
          dest: str | os.PathLike = DEFAULT_DIR, cuda_home: str | None = None, jobs: int = 2) -> Path:
    """Compile the RoPE module of a ``flashinfer-python`` wheel into ``dest/LIB_NAME``.

    ``tvm_ffi_root`` is the folder holding the ``tvm_ffi`` package (its headers);
    by default the installed one. The command lines go to ``dest/BUILD.txt``.
    """
    dest = Path(dest)
    cuda_home = cuda_home or os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    nvcc = str(Path(cuda_home) / "bin" / "nvcc")
    if tvm_ffi_root is None:
        import tvm_ffi

        tvm_ffi_root = Path(tvm_ffi.__file__).resolve().parent.parent
    tvm_inc = Path(tvm_ffi_root) / "tvm_ffi" / "include"
    if not (tvm_inc / "tvm" / "ffi").is_dir():
        raise FileNotFoundError(f"build: no tvm_ffi headers under {tvm_inc}")
    work = Path(tempfile.mkdtemp(prefix="fi_rope_"))
    try:
        with zipfile.ZipFile(wheel) as zf:
            keep = [n for n in zf.namelist()
                    if n.startswith(("flashinfer/data/include/", "flashinfer/data/cccl/"))
                    or n in {f"flashinfer/data/csrc/{s}" for s in SOURCES + ("tvm_ffi_utils.h",)}]
            zf.extractall(work, keep)
            version = next((n.split("/")[0] for n in zf.namelist() if n.endswith(".dist-info/METADATA")), "?")
        data = work / "flashinfer" / "data"
        cccl = [data / "cccl" / "cub", data / "cccl" / "libcudacxx" / "include", data / "cccl" / "thrust"]
        includes = ([f"-I{p}" for p in cccl] + ["-isystem", f"{cuda_home}/include", "-isystem", str(tvm_inc),
                    "-isystem", str(tvm_inc.parent / "include" / "dlpack"), "-isystem", str(data / "include"),
                    "-isystem", str(data / "csrc")])
        abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
        cmds, objs = [], []
        for src in SOURCES:
            obj = work / (src + ".o")
            cmds.append([nvcc, abi, *includes, *NVCC_FLAGS, f"--threads={jobs}", "-c", str(data / "csrc" / src),
                         "-o", str(obj)])
            objs.append(str(obj))
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / LIB_NAME
        # cudart linked statically (nvcc's default), so the library needs only the driver where it runs
        libcuda = ["-lcuda"] if (Path(cuda_home) / "lib64" / "stubs" / "libcuda.so").exists() else []
        cmds.append([nvcc, "-shared", "-gencode=arch=compute_90a,code=sm_90a", *objs,
                     f"-L{cuda_home}/lib64", f"-L{cuda_home}/lib64/stubs", *libcuda, "-o", str(out)])
        log = [f"# from {Path(wheel).name} ({version}), tvm_ffi headers {tvm_inc}"]
        for cmd in cmds:
            log.append(" ".join(cmd))
            subprocess.run(cmd, check=True)
        (dest / "BUILD.txt").write_text("\n".join(log) + "\n")
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def library_path() -> Path | None:
    env = os.environ.get("MLA_PASSES_FLASHINFER_ROPE_SO")
    for p in ([Path(env)] if env else []) + [DEFAULT_DIR / LIB_NAME]:
        if p.is_file():
            return p
    return None


def load():
    """FlashInfer's exported ``rope_quantize_append_paged_kv_cache`` (raises with the reason if absent)."""
    if hasattr(load, "fn"):
        return load.fn
    path = library_path()
    if path is None:
        raise FileNotFoundError(f"no FlashInfer RoPE library at {DEFAULT_DIR / LIB_NAME} (build it: "
                                "python -m mla_passes.bench.loaders.flashinfer_stub FLASHINFER_WHEEL [TVM_FFI_ROOT])")
    import tvm_ffi  # ImportError names the missing apache-tvm-ffi

    mod = tvm_ffi.load_module(str(path))
    load.fn = mod["rope_quantize_append_paged_kv_cache"] if hasattr(mod, "__getitem__") else \
        getattr(mod, "rope_quantize_append_paged_kv_cache")
    return load.fn


def page_table_from_slots(slot_mapping: torch.Tensor, block_size: int):
    """FlashInfer's paged-append indexing for vLLM slots: one one-page "request" per token.

    Returns int32 ``(kv_indices, kv_indptr, batch_indices, positions)`` with
    ``kv_indices = slot // block``, ``positions = slot % block``,
    ``kv_indptr = arange(n + 1)``, ``batch_indices = arange(n)``; a padding
    token (slot < 0) gets ``batch_indices = -1``, which FlashInfer's kernel
    skips entirely (no cache row, and no q row either).
    """
    slots = slot_mapping.long()
    n = slots.shape[0]
    valid = slots >= 0
    kv_indices = torch.where(valid, slots // block_size, 0).int()
    positions = torch.where(valid, slots % block_size, 0).int()
    batch_indices = torch.where(valid, torch.arange(n, device=slots.device), -1).int()
    kv_indptr = torch.arange(n + 1, device=slots.device, dtype=torch.int32)
    return kv_indices, kv_indptr, batch_indices, positions


class MlaCall:
    """The arguments FlashInfer's wrapper builds for MLA, made once (outside any CUDA graph).

    ``ckv_cache [pages, page, L]`` and ``kpe_cache [pages, page, R]`` are fp8
    views of the cache; ``q_nope_out``/``q_rope_out`` may be views of one
    ``[T, H, L + R]`` fp8 tensor (the kernel takes strides). FlashInfer
    MULTIPLIES by its quant scales: pass ``1 / scale``.
    """

    def __init__(self, q_rope, k_rope, q_nope, k_nope, q_rope_out, q_nope_out, cos_sin_cache, pos_ids,
                 ckv_cache, kpe_cache, slot_mapping, block_size, quant_scale_q, quant_scale_kv, is_neox):
        if cos_sin_cache.dtype != torch.float32:
            raise ValueError("cos_sin_cache should be float32")
        if k_rope.ndim != 2 or k_nope.ndim != 2:
            raise ValueError("MLA: k_rope and k_nope are [T, dim]")
        dev = q_rope.device
        table = page_table_from_slots(slot_mapping, block_size)
        empty_q8 = torch.empty(0, dtype=q_rope_out.dtype, device=dev)
        self.args = (q_rope, k_rope.unsqueeze(1), q_nope, k_nope.unsqueeze(1),
                     torch.empty(0, dtype=q_rope.dtype, device=dev),   # v (unused for MLA)
                     q_rope_out, q_nope_out, cos_sin_cache, pos_ids,
                     empty_q8, empty_q8.clone(), ckv_cache, kpe_cache,  # k_cache, v_cache (GQA only)
                     *table, NHD, block_size, float(quant_scale_q), float(quant_scale_kv),
                     not is_neox, False)                                # interleave, enable_pdl

    def __call__(self, fn=None):
        (fn or load())(*self.args)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        print("usage: python -m mla_passes.bench.loaders.flashinfer_stub FLASHINFER_WHEEL [TVM_FFI_ROOT]", file=sys.stderr)
        sys.exit(2)
    print(build(*sys.argv[1:]))
