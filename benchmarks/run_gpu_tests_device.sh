#!/usr/bin/env bash
# The whole `pytest -m gpu` in two device calls (it takes more than one call's 10 minutes; session 15's
# single call stopped at 73 %): PART=gemv runs tests/test_cuda_gemv.py, PART=rest everything else.
# Builds the CUDA extension first unless the warm machine still has it.  Log and summary in $OUT.
#     PART=gemv OUT=$OUT bash benchmarks/run_gpu_tests_device.sh      (carry .whl: the bitsandbytes wheel)
OUT="${OUT:-/tmp/lk_out}"; mkdir -p "$OUT"; PART="${PART:-gemv}"; ENV_S="${ENVELOPE:-560}"
set +e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LORA_KERNELS_QUIET=1
echo "=== build $(date +%T)"; T=$SECONDS
ls lora_kernels/_C_cuda*.so > /dev/null 2>&1 || LORA_KERNELS_CUDA_ARCHS=9.0 LORA_KERNELS_BUILD_CUDA=1 MAX_JOBS=16 \
  timeout 300 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -20 "$OUT/build.log"; exit 1; }
echo "build $(( SECONDS - T )) s"
if [ "$PART" = "gemv" ]; then SEL="tests/test_cuda_gemv.py"; else SEL="tests --ignore=tests/test_cuda_gemv.py"; fi
echo "=== pytest -m gpu $SEL $(date +%T)"
timeout $(( ENV_S - SECONDS )) python3 -m pytest -m gpu -q -p no:cacheprovider -rfs $SEL > "$OUT/gpu_tests_$PART.log" 2>&1
echo "pytest rc=$?"
grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_tests_$PART.log" | tail -20 | cut -c1-250
echo "=== end $(date +%T) ($SECONDS s)"
