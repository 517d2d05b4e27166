#!/usr/bin/env bash
# The whole `pytest -m gpu` in device calls of < 10 minutes each (session 15's single call stopped at
# 73 %): PART=gemv runs tests/test_cuda_gemv.py (~2 min on the H100), PART=rest everything else (more
# than 7 min: session 16's call stopped at ~70 %), or that split in two: PART=rest1 (autograd, forward,
# NF4 kernels) and PART=ops (the model ops and the Triton merge / NF4 kernels, the files rest reached last);
# PART=custom runs the selection in $TESTS.
# Builds the CUDA extension first unless the warm machine still has it.  Log and summary in $OUT.
#     PART=gemv OUT=$OUT bash benchmarks/run_gpu_tests_device.sh      (carry .whl: the bitsandbytes wheel)
OUT="${OUT:-/tmp/lk_out}"; mkdir -p "$OUT"; PART="${PART:-gemv}"; ENV_S="${ENVELOPE:-560}"
set +e
source benchmarks/device_env.sh
case "$PART" in
  gemv) SEL="tests/test_cuda_gemv.py" ;;
  rest) SEL="tests --ignore=tests/test_cuda_gemv.py" ;;
  ops) SEL="tests/test_model_ops_cross_entropy.py tests/test_model_ops_rms_norm.py tests/test_model_ops_rope.py tests/test_model_ops_swiglu.py tests/test_triton_merge.py tests/test_triton_nf4.py" ;;
  custom) SEL="${TESTS:?PART=custom needs TESTS}" ;;
  rest1) SEL="tests --ignore=tests/test_cuda_gemv.py $(echo tests/test_model_ops_*.py tests/test_triton_merge.py tests/test_triton_nf4.py | sed 's/[^ ]* */--ignore=&/g')" ;;
  *) echo "PART must be gemv, rest, rest1, ops or custom (TESTS=...)"; exit 2 ;;
esac
echo "=== pytest -m gpu $SEL $(date +%T)"
timeout $(( ENV_S - SECONDS )) python3 -m pytest -m gpu -q -p no:cacheprovider -rfs $SEL > "$OUT/gpu_tests_$PART.log" 2>&1
echo "pytest rc=$?"
grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_tests_$PART.log" | tail -20 | cut -c1-250
echo "=== end $(date +%T) ($SECONDS s)"
