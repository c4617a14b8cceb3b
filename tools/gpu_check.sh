#!/usr/bin/env bash
# Everything this repo asks of a GPU, in a few device calls (each < 10 min):
#   tools/gpu_check.sh tests   - the GPU pytest tests (kernel parity grid in both RoPE
#                                conventions, CUDA-graph replay, guard bands; the passes on CUDA)
#   tools/gpu_check.sh diag    - variant cross-check vs the reference, both conventions, and
#                                where the fused kernel's time goes (parts on/off, registers/spills)
#   tools/gpu_check.sh bench-fp8 | bench-bf16
#                              - `mla-passes bench`, GPT-J and NeoX, one case each (tables, JSON, PNG)
#   tools/gpu_check.sh pdl     - the programmatic-dependent-launch GPU tests only (parity, CUDA-graph replay)
#   tools/gpu_check.sh kbench-step - the kernel bench at the step's shapes (GPT-J, H 8 16 64 128, PDL column)
#   tools/gpu_check.sh sweep-small-h - launch-config sweep of the fused kernel at H 8 and 16
#   tools/gpu_check.sh step    - `mla-passes bench-step`: a DeepSeek-V3 decode step with the passes off and on
#                                (needs vLLM's Triton MLA decode file in .whl/vllm_triton: python -m mla_passes.bench.loaders.vllm_mla_stub)
#   tools/gpu_check.sh vllm    - real vLLM (../shared/gpu-vllm kit): flag off vs on per MLA backend, KV-cache
#                                dtype and cudagraph mode: tokens, KV-cache rows, report (tools/gpu_vllm.py)
#   tools/gpu_check.sh vllm-step - real vLLM time per output token: off / control (flag-on config, no rewrite) /
#                                vLLM's own MLA fusion / mla-passes
#   tools/gpu_check.sh all     - all of the above but vllm* (longer than one device call)
# (the engine folders stay in /tmp: $OUT takes 8 files at most)
# Logs, JSON and PNGs go under $OUT (the device tool's result folder) or ./gpu_out.
# Needs: torch with CUDA, triton, pytest (matplotlib for the PNG); AITER's Triton sources under
# .whl/aiter_py (python -m mla_passes.bench.loaders.aiter_stub AMD_AITER_WHEEL) for the AITER column; for the FlashInfer
# column (fp8 case), .whl/flashinfer_rope/flashinfer_rope_sm90a.so (python -m mla_passes.bench.loaders.flashinfer_stub
# FLASHINFER_WHEEL, built where nvcc is) and an apache_tvm_ffi cp312 wheel in .whl/ (installed below).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
rc=0
nvidia-smi -L || true
if ! python3 -c "import tvm_ffi" 2>/dev/null && ls .whl/apache_tvm_ffi-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/tvm_ffi_site \
    .whl/apache_tvm_ffi-*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/tvm_ffi_site
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

for what in "$@"; do
case $what in
tests|all)
  echo "== GPU kernel tests"
  timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -m gpu -p no:cacheprovider --noconftest -rfE --durations=5 \
    tests/test_triton_kernel.py >"$OUT/gpu_tests.log" 2>&1 || rc=1
  tail -n 12 "$OUT/gpu_tests.log"
  echo "== GPU pass tests (Inductor on CUDA, CUDA-graph replay of the fused op)"
  # mla_passes.patterns lives in patterns/: stage the installed layout (no pip there)
  # and run from outside the repo so it is the one imported.
  pkg=$(mktemp -d) && cp -r mla_passes "$pkg/" && cp -r patterns "$pkg/mla_passes/patterns"
  repo=$PWD
  (cd "$(mktemp -d)" && PYTHONPATH=$pkg timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -p no:cacheprovider -rfE \
    --rootdir="$repo" -c "$repo/pyproject.toml" "$repo/tests/test_gpu_passes.py" \
    >"$OUT/gpu_pass_tests.log" 2>&1) || rc=1
  grep -v DEBUG "$OUT/gpu_pass_tests.log" | tail -n 8
  ;;&
diag|all)
  echo "== variant cross-check (bf16, fp8 cache, fp8 q; GPT-J and NeoX)"
  timeout ${CHECK_TIMEOUT:-200} python3 -m mla_passes.bench.kernel --check-only --rope gptj,neox --heads 16 128 --tokens 1 64 256 \
    --json "$OUT/check.json" >"$OUT/check.log" 2>&1 || rc=1
  grep -c '"other_cache_rows_untouched": true' "$OUT/check.log"; tail -n 3 "$OUT/check.log"
  echo "== where the time goes (kernel parts on/off), GPT-J vs NeoX"
  timeout ${DIAG_TIMEOUT:-200} python3 -m mla_passes.bench.kernel --rope gptj,neox --cases fp8 --heads 16 128 --tokens 1 64 256 \
    --variants fused,fused_rope,fused_absorb,fused_cache --json "$OUT/diag.json" 2>&1 \
    | grep -v '^\[row\]' | tee "$OUT/diag.log" || rc=1
  ;;&
pdl|all)
  echo "== PDL tests (parity, CUDA-graph replay after a producer)"
  timeout ${PDL_TIMEOUT:-120} python3 -m pytest -q -m gpu -p no:cacheprovider --noconftest -rfE -k pdl \
    tests/test_triton_kernel.py >"$OUT/gpu_pdl_tests.log" 2>&1 || rc=1
  tail -n 6 "$OUT/gpu_pdl_tests.log"
  ;;&
kbench-step|all)
  # KBENCH_CASES (default fp8; fp8kv = fp8 cache + bf16 q, bf16), KBENCH_HEADS, KBENCH_VARIANTS, KBENCH_ARGS
  kc=${KBENCH_CASES:-fp8}; tag=kbench_${kc//,/_}
  echo "== kernel bench at the step's shapes (cases $kc, GPT-J)"
  timeout ${KBENCH_TIMEOUT:-200} python3 -m mla_passes.bench.kernel --rope gptj --cases "$kc" --heads ${KBENCH_HEADS:-8 16 64 128} \
    --variants ${KBENCH_VARIANTS:-fused,compile,fused_pdl,aiter,flashinfer} ${KBENCH_ARGS-} --json "$OUT/$tag.json" \
    --plot "$OUT/$tag.png" >"$OUT/$tag.log" 2>&1 || rc=1
  grep -v '^\[' "$OUT/$tag.log"
  ;;&
sweep-small-h)
  echo "== launch-config sweep at small H (fp8, GPT-J): more absorb programs, other side blocks"
  timeout ${SWEEP_TIMEOUT:-150} python3 -m mla_passes.bench.kernel --rope gptj --cases fp8 --heads 8 16 --tokens ${SWEEP_TOKENS:-1 8 64 128 256 512} \
    --variants fused --sweep --reps 10 --json "$OUT/sweep.json" >"$OUT/sweep.log" 2>&1 || rc=1
  grep -A40 '^sweep: best' "$OUT/sweep.log"
  ;;&
step|all)
  # STEP_TAG names the output files (default step); STEP_ARGS adds options (e.g. --attn-q bf16)
  st=${STEP_TAG:-step}
  echo "== decode step (DeepSeek-V3 layers, vLLM Triton MLA attention), passes off vs on: $st ${STEP_ARGS-}"
  # mla_passes.patterns lives in patterns/: stage the installed layout (as for the pass tests)
  pkg=$(mktemp -d) && cp -r mla_passes "$pkg/" && cp -r patterns "$pkg/mla_passes/patterns"
  # run from outside the repo, so that the staged package is the one imported; the loader of vLLM's
  # attention kernel (mla_passes.bench.loaders.vllm_mla_stub) is told where the kernel file is
  (src=$PWD/.whl/vllm_triton/triton_decode_attention.py && repo=$PWD && cd "$(mktemp -d)" && MLA_PASSES_VLLM_MLA_SRC=$src \
    PYTHONPATH=$pkg:$repo timeout ${STEP_TIMEOUT:-400} python3 -m mla_passes.bench.step --pdl ${STEP_ARGS-} \
    --json "$OUT/$st.json" --plot "$OUT/$st.png" >"$OUT/$st.log" 2>&1) || rc=1
  grep -v '^\[' "$OUT/$st.log"; grep -c '^\[row\]' "$OUT/$st.log"
  ;;&
vllm)
  # Real vLLM (the ../shared/gpu-vllm kit installed into /tmp/site, mla-passes installed there
  # too: its plugin entry point must be visible; tools/ is not installed: the checkout comes after
  # /tmp/site on the path). VLLM_ARGS adds options (e.g. --only v2_TRITON).
  echo "== real vLLM, flag off vs on: MLA backends x KV-cache dtypes x cudagraph modes"
  repo=$PWD
  (cd "$(mktemp -d)" && PYTHONPATH=${VLLM_SITE:-/tmp/site}:$repo TORCHINDUCTOR_COMPILE_THREADS=1 timeout ${VLLM_TIMEOUT:-560} python3 -P -m tools.gpu_vllm \
    check --out /tmp/mla_vllm_check ${VLLM_ARGS-} >"$OUT/vllm_check.log" 2>&1) || rc=1
  cp /tmp/mla_vllm_check/check.json "$OUT/vllm_check.json" 2>/dev/null
  grep -v '^\[' "$OUT/vllm_check.log" | tail -n 60
  ;;&
vllm-step)
  # VLLM_STEP_ARGS: e.g. --heads 16 --batches 1 16 64 256 --contexts 1024 4096
  echo "== real vLLM decode step: time per output token, off / control / vLLM's own fusion / mla-passes"
  repo=$PWD
  (cd "$(mktemp -d)" && PYTHONPATH=${VLLM_SITE:-/tmp/site}:$repo timeout ${VLLM_STEP_TIMEOUT:-560} python3 -P -m tools.gpu_vllm \
    step --out /tmp/mla_vllm_step ${VLLM_STEP_ARGS-} >"$OUT/vllm_step.log" 2>&1) || rc=1
  cp /tmp/mla_vllm_step/step.json "$OUT/vllm_step.json" 2>/dev/null
  grep -v '^\[engine\]' "$OUT/vllm_step.log" | tail -n 60
  ;;&
bench-fp8|bench-bf16|all)
  cases=${what#bench-}; [ "$what" = all ] && cases="fp8 bf16"
  for c in $cases; do
    echo "== bench: $c case (fp8: fp8 cache + fp8 q; bf16: bf16 model, kv_cache_dtype=auto)"
    timeout ${BENCH_TIMEOUT:-560} python3 -m mla_passes.bench.kernel --rope gptj,neox --cases "$c" ${BENCH_ARGS-} \
      --json "$OUT/bench_$c.json" --plot "$OUT/bench_$c.png" >"$OUT/bench_$c.log" 2>&1 || rc=1
    grep -v '^\[' "$OUT/bench_$c.log"
  done
  ;;
esac
done
exit $rc
