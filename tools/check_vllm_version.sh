#!/usr/bin/env bash
# Run the plugin/config tests against one GPU release of vLLM (0.33, 0.34, ...) on a CPU box.
#
#   tools/check_vllm_version.sh 0.34.0          # venv /tmp/mla-passes-vllm-0.34.0 (reused when present)
#   tools/check_vllm_version.sh 0.33.0 -x       # arguments after the version go to pytest
#   VLLM_CHECK_VENV=/path tools/check_vllm_version.sh 0.34.0
#
# vLLM's GPU releases ship as a CUDA wheel that pins one torch (0.33 and 0.34:
# torch 2.14.0) and certifi>=2026.10.19, newer than some registries carry, so a
# plain `pip install vllm==X` can fail. This script builds a venv of its own per
# version, installs torch (TORCH_VERSION, default 2.14.1, the build on this
# machine's disk; checked to import), vllm X with --no-deps, vLLM's other
# requirements except the GPU kernel packages, the torch family and the
# certifi pin, and this repo (editable, --no-deps), then runs
# tests/test_vllm_patches.py, tests/test_vllm_config.py, tests/test_vllm_compat.py
# and the in-process config tests of tests/test_vllm_e2e.py with
# VLLM_TARGET_DEVICE=cpu. No model runs: the wheel's kernels are CUDA builds.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
if [ $# -lt 1 ] || ! [[ $1 =~ ^0\.[0-9]+\.[0-9]+$ ]]; then
  echo "usage: tools/check_vllm_version.sh VLLM_VERSION [PYTEST_ARGS...]   (e.g. 0.34.0)" >&2
  exit 2
fi
VLLM_VERSION=$1
shift
VENV=${VLLM_CHECK_VENV:-/tmp/mla-passes-vllm-$VLLM_VERSION}
PY=${PYTHON:-python3}
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
"$VENV/bin/python" -W ignore -c "import torch; torch.zeros(1)"  # the torch beside the wheel's pin must load
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
  tests/test_vllm_patches.py tests/test_vllm_config.py tests/test_vllm_compat.py \
  "tests/test_vllm_e2e.py::test_flag_off_hash_unchanged" \
  "tests/test_vllm_e2e.py::test_bridge_threshold_and_composition" \
  "tests/test_vllm_e2e.py::test_bridge_flag_off_untouched" \
  "tests/test_vllm_e2e.py::test_unsupported_vllm_version_refused" "$@"
