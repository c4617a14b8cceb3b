#!/usr/bin/env bash
# Everything this repo asks of a GPU, for one or two device calls:
#   tools/gpu_check.sh tests   - the GPU pytest tests (kernel, and the passes on CUDA)
#   tools/gpu_check.sh bench   - variant cross-check + `mla-passes bench` (+ config sweep)
#   tools/gpu_check.sh all     - both
# Logs and JSON go under $OUT (the device tool's result folder) or ./gpu_out.
# Needs: torch with CUDA, triton, pytest; AITER's Triton sources under
# .whl/aiter_py (python -m tools.aiter_stub AMD_AITER_WHEEL) for the AITER column.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
what=${1:-all}
rc=0
nvidia-smi -L || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

if [ "$what" = tests ] || [ "$what" = all ]; then
  echo "== GPU tests"
  timeout ${TEST_TIMEOUT:-540} python3 -m pytest -q -m gpu -p no:cacheprovider --noconftest -rfE --durations=15 tests/test_triton_kernel.py \
    --junitxml="$OUT/gpu_tests.xml" >"$OUT/gpu_tests.log" 2>&1 || rc=1
  tail -n 40 "$OUT/gpu_tests.log"
  echo "== GPU pass tests (Inductor on CUDA, CUDA-graph replay of the fused op)"
  # mla_passes.patterns / mla_passes.tools live in patterns/ and tools/: stage the
  # installed layout (no pip there) and run from outside the repo so it is the one imported.
  pkg=$(mktemp -d) && cp -r mla_passes "$pkg/" && cp -r patterns "$pkg/mla_passes/patterns" \
    && cp -r tools "$pkg/mla_passes/tools"
  repo=$PWD
  (cd "$(mktemp -d)" && PYTHONPATH=$pkg timeout ${TEST_TIMEOUT:-540} python3 -m pytest -q -p no:cacheprovider -rfE \
    --rootdir="$repo" -c "$repo/pyproject.toml" "$repo/tests/test_gpu_passes.py" \
    >"$OUT/gpu_pass_tests.log" 2>&1) || rc=1
  grep -v DEBUG "$OUT/gpu_pass_tests.log" | tail -n 20
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  echo "== variant cross-check (bf16, fp8 cache, fp8 q)"
  timeout ${CHECK_TIMEOUT:-300} python3 -m tools.bench --check-only --heads 16 128 --tokens 1 64 --json "$OUT/check.json" \
    >"$OUT/check.log" 2>&1 || rc=1
  tail -n 12 "$OUT/check.log"
  echo "== bench"
  timeout ${BENCH_TIMEOUT:-900} python3 -m tools.bench ${BENCH_ARGS---sweep} --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" || rc=1
fi
exit $rc
