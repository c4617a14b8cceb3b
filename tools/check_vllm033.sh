#!/usr/bin/env bash
# Run the plugin/config tests against vLLM 0.33 (the current release) on a CPU box.
#
# vLLM 0.33 ships as a CUDA wheel (torch 2.14) and pins certifi>=2026.10.19,
# newer than some registries carry, so a plain `pip install vllm==0.33.0`
# can fail. This script builds a separate venv (default /tmp/mla-passes-vllm033,
# reused when present), installs torch 2.14.1 with its CUDA libraries, vllm
# 0.33.0 with --no-deps, vLLM's other requirements except the GPU kernel
# packages and the certifi pin, and this repo (editable), then runs
# tests/test_vllm_patches.py, tests/test_vllm_config.py and the in-process
# config tests of tests/test_vllm_e2e.py with VLLM_TARGET_DEVICE=cpu.
#
#   tools/check_vllm033.sh            # build (first time: several GB, minutes) and test
#   VLLM033_VENV=/path tools/check_vllm033.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${VLLM033_VENV:-/tmp/mla-passes-vllm033}
PY=${PYTHON:-python3}
VLLM_VERSION=0.33.0
TORCH_VERSION=${TORCH_VERSION:-2.14.1}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# pip, minus the noise of this machine's unused local index entries; keeps pip's exit code (pipefail).
PIP=pipq
pipq() { "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  $PIP install -q "torch==$TORCH_VERSION"
fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('vllm') == '$VLLM_VERSION'" 2>/dev/null; then
  $PIP install -q --no-deps "vllm==$VLLM_VERSION"
fi

# vLLM's own requirements, less GPU kernel packages (they do not install or
# import on CPU, and nothing here calls them), the torch family (installed
# above, or not needed) and the certifi pin.
$PIP install -q packaging
REQS=$("$VENV/bin/python" - <<'PY'
import importlib.metadata as md
from packaging.requirements import Requirement
skip = {"torch", "torchaudio", "torchvision", "torchcodec", "certifi", "pynvvideocodec", "flashinfer-python",
        "apache-tvm-ffi", "tilelang", "nvidia-cudnn-frontend", "nvtx", "fastsafetensors", "instanttensor",
        "nvidia-cutlass-dsl", "quack-kernels", "tokenspeed-mla", "humming-kernels", "numba"}
for r in md.requires("vllm") or []:
    req = Requirement(r)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() not in skip:
        print(str(req).split(";")[0].replace(" ", ""))
PY
)
if [ ! -f "$VENV/.mla_passes_reqs_done" ]; then
  # shellcheck disable=SC2086
  $PIP install -q certifi $REQS
  $PIP install -q "pytest>=8" "hypothesis>=6"
  touch "$VENV/.mla_passes_reqs_done"
fi
$PIP install -q --no-deps -e "$REPO"

export VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1
"$VENV/bin/python" -c "import vllm, torch; print('vLLM', vllm.__version__, 'torch', torch.__version__)"
cd "$REPO"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_vllm_patches.py tests/test_vllm_config.py \
  "tests/test_vllm_e2e.py::test_flag_off_hash_unchanged" \
  "tests/test_vllm_e2e.py::test_bridge_threshold_and_composition" \
  "tests/test_vllm_e2e.py::test_bridge_flag_off_untouched" \
  "tests/test_vllm_e2e.py::test_unsupported_vllm_version_refused" "$@"
