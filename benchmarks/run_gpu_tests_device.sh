#!/usr/bin/env bash
# The whole `pytest -m gpu` in two device calls (it takes more than one call's 10 minutes; session 15's
# single call stopped at 73 %): PART=gemv runs tests/test_cuda_gemv.py, PART=rest everything else.
# Builds the CUDA extension first unless the warm machine still has it.  Log and summary in $OUT.
#     PART=gemv OUT=$OUT bash benchmarks/run_gpu_tests_device.sh      (carry .whl: the bitsandbytes wheel)
OUT="${OUT:-/tmp/lk_out}"; mkdir -p "$OUT"; PART="${PART:-gemv}"; ENV_S="${ENVELOPE:-560}"
set +e
source benchmarks/device_env.sh
if [ "$PART" = "gemv" ]; then SEL="tests/test_cuda_gemv.py"; else SEL="tests --ignore=tests/test_cuda_gemv.py"; fi
echo "=== pytest -m gpu $SEL $(date +%T)"
timeout $(( ENV_S - SECONDS )) python3 -m pytest -m gpu -q -p no:cacheprovider -rfs $SEL > "$OUT/gpu_tests_$PART.log" 2>&1
echo "pytest rc=$?"
grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_tests_$PART.log" | tail -20 | cut -c1-250
echo "=== end $(date +%T) ($SECONDS s)"
