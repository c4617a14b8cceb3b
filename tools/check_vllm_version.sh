#!/usr/bin/env bash
# Run the plugin/config tests against one GPU release of vLLM (0.33, 0.34, ...) on a CPU box.
#
#   tools/check_vllm_version.sh 0.34.0          # venv /tmp/mla-passes-vllm-check (reused)
#   tools/check_vllm_version.sh 0.33.0 -x       # arguments after the version go to pytest
#   VLLM_CHECK_VENV=/path tools/check_vllm_version.sh 0.34.0
#
# vLLM's GPU releases ship as a CUDA wheel that pins one torch (0.33 and 0.34:
# torch 2.14.0) and certifi>=2026.10.19, newer than some registries carry, so a
# plain `pip install vllm==X` can fail. This script keeps one venv for every
# release (a second version replaces the first's vllm, so the disk holds one
# set of packages, about 3.5 GB): torch (TORCH_VERSION, default 2.13.0, the
# CPU build the suite runs; the CUDA build of the pinned torch with its CUDA
# libraries costs about 7 GB a venv, more than a CI machine's disk has had
# free), vllm X with --no-deps, vLLM's other requirements except the GPU kernel
# packages, the torch family and the certifi pin, and this repo (editable,
# --no-deps). Before any test it checks that no torch version gate in vLLM's
# source (is_torch_equal_or_newer / is_torch_equal) falls between the torch it
# runs and the one the wheel pins, so the config paths taken are the pinned
# torch's; a gate there fails the check. Then it runs tests/test_vllm_patches.py,
# tests/test_vllm_config.py, tests/test_vllm_compat.py and the in-process config
# tests of tests/test_vllm_e2e.py with VLLM_TARGET_DEVICE=cpu. No model runs:
# the wheel's kernels are CUDA builds.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
if [ $# -lt 1 ] || ! [[ $1 =~ ^0\.[0-9]+\.[0-9]+$ ]]; then
  echo "usage: tools/check_vllm_version.sh VLLM_VERSION [PYTEST_ARGS...]   (e.g. 0.34.0)" >&2
  exit 2
fi
VLLM_VERSION=$1
shift
VENV=${VLLM_CHECK_VENV:-/tmp/mla-passes-vllm-check}
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

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
if [ ! -f "$VENV/.mla_passes_reqs_$VLLM_VERSION" ]; then
  # shellcheck disable=SC2086
  $PIP install -q certifi $REQS
  $PIP install -q "pytest>=8" "hypothesis>=6"
  touch "$VENV/.mla_passes_reqs_$VLLM_VERSION"
fi
$PIP install -q --no-deps -e "$REPO"

# vLLM picks config paths by torch version; the torch run here must sit on the
# same side of every such gate as the torch the wheel pins.
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md, pathlib, re, sys
import torch
from packaging.requirements import Requirement
from packaging.version import Version

pinned = [Requirement(r) for r in md.requires("vllm") or [] if Requirement(r).name == "torch"]
pins = [s.version for r in pinned for s in r.specifier if s.operator == "=="]
if not pins:
    print("[check] vLLM pins no torch version: no gate to compare")
    sys.exit(0)
ran, pin = Version(torch.__version__.split("+")[0]), Version(pins[0])
root = pathlib.Path(md.distribution("vllm").locate_file("vllm"))
gate = re.compile(r"is_torch_equal(_or_newer)?\(\s*[\"']([0-9][^\"']*)[\"']")
# Gates inside these functions are known not to touch what the tests check.
known = {
    "compile_on_one_rank": "VLLM_COMPILE_ON_ONE_RANK, opt-in (default off), CUDA/XPU only",
    "set_compile_on_one_rank": "applies VLLM_COMPILE_ON_ONE_RANK to torch's compiler config",
}
hits, skipped = [], []
for f in root.rglob("*.py"):
    func = None
    for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
        m = re.match(r"\s*(?:async\s+)?def\s+(\w+)", line)
        if m:
            func = m.group(1)
        for newer, v in gate.findall(line):
            g = Version(v)
            if newer:
                differs = (ran >= g) != (pin >= g)
            else:  # vLLM compares the release part only
                differs = (ran.release == g.release) != (pin.release == g.release)
            if differs:
                where = f"{f.relative_to(root.parent)}:{n} ({func}): {line.strip()}"
                (skipped if func in known else hits).append(where + (f"  [{known[func]}]" if func in known else ""))
for where in skipped:
    print(f"[check] torch gate left alone: {where}")
if hits:
    print(f"[check] vLLM gates on a torch version between the torch run here ({ran}) and its pin ({pin}):", file=sys.stderr)
    print("\n".join(hits), file=sys.stderr)
    print("[check] set TORCH_VERSION to the pinned torch", file=sys.stderr)
    sys.exit(1)
print(f"[check] no other torch version gate in vLLM between torch {ran} (run) and {pin} (pinned)")
PY

export VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1
"$VENV/bin/python" -c "import vllm, torch; print('vLLM', vllm.__version__, 'torch', torch.__version__)"
cd "$REPO"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_vllm_patches.py tests/test_vllm_config.py tests/test_vllm_compat.py \
  "tests/test_vllm_e2e.py::test_flag_off_hash_unchanged" \
  "tests/test_vllm_e2e.py::test_bridge_threshold_and_composition" \
  "tests/test_vllm_e2e.py::test_bridge_flag_off_untouched" \
  "tests/test_vllm_e2e.py::test_unsupported_vllm_version_refused" "$@"
