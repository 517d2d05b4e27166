#!/usr/bin/env bash
# Session 18's first device call, ENVELOPE s (default 560): build; the decode kernel's v5 / finish /
# piece-map GPU tests (TESTK, default "v5 or finish or piece": re-verifies the review commit e84c707,
# compiled only in session 17); the opt-in overlapped merge pipeline's GPU test (LORA_KERNELS_MERGE_OVERLAP); where issue 4's training step at M = 4096 spends its time beyond the
# cuBLAS pair (benchmarks/training_probe.py, SHAPES at MS, for each merge workspace in WSMB); then, with
# the time left, ncu of variant 5 at 14336x4096 M = 16 r = 16 under both piece maps with the warp-state
# and source counters (issue 3: why light-first loses at K = 14336).
#     OUT=$OUT bash benchmarks/run_training_probe_device.sh      (carry .whl: the bitsandbytes wheel)
OUT="${OUT:-/tmp/lk_out}"; mkdir -p "$OUT"; TAG="${SESSION_TAG:-session18}"; ENV_S="${ENVELOPE:-560}"
set +e
source benchmarks/device_env.sh
GPU=$(python3 -c "import torch,re;print(re.sub('[^a-z0-9]+','-',torch.cuda.get_device_name().lower()).strip('-'))")
echo "=== $GPU; git $(git rev-parse --short HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed"
if [ -n "${TESTK-v5 or finish or piece}" ]; then
  echo "=== gemv tests $(date +%T)"
  timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider -rf --maxfail=5 tests/test_cuda_gemv.py \
    -k "${TESTK:-v5 or finish or piece}" > "$OUT/gemv_tests.log" 2>&1
  echo "pytest rc=$?"; tail -2 "$OUT/gemv_tests.log" | cut -c1-250
  grep -E "^FAILED|^ERROR" "$OUT/gemv_tests.log" | head -10 | cut -c1-300
fi
echo "=== overlap test $(date +%T)"
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider -rf tests/test_autograd_gpu.py tests/test_triton_lora_grad.py -k "overlapped or never_allocates or dy_pass" \
  > "$OUT/overlap_tests.log" 2>&1; ORC=$?
echo "pytest rc=$ORC"; tail -2 "$OUT/overlap_tests.log" | cut -c1-250; grep -E "^FAILED|^E " "$OUT/overlap_tests.log" | head -10 | cut -c1-300
echo "=== training probe $(date +%T)"
timeout $(( ENV_S - SECONDS - 90 )) python3 -m benchmarks.training_probe --shapes ${SHAPES:-8192x28672,4096x14336,28672x8192,14336x4096} \
  --ms ${MS:-4096} --workspace-mb ${WSMB:-32,64,256,100000} --json "$OUT/training_probe_${GPU}_$TAG.json" > "$OUT/training_probe.log" 2>&1
echo "probe rc=$?"; cut -c1-700 "$OUT/training_probe.log" | tail -30
command -v ncu > /dev/null || { echo "no ncu"; exit 0; }
for PIECES in slot light; do
  LEFT=$(( ENV_S - SECONDS )); [ $LEFT -gt 40 ] || break
  F="$OUT/ncu_v5_14336x4096_m16_r16_${PIECES}_$TAG.txt"; echo "=== ncu $PIECES ($LEFT s left) $(date +%T)"
  LORA_KERNELS_GEMV_V5_PIECES=$PIECES LORA_KERNELS_GEMV_VARIANT=5 timeout $(( LEFT - 10 )) ncu --clock-control none \
    -k "regex:nf4_gemv_v5_kernel" --launch-skip 8 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
    --section SourceCounters --section SchedulerStats python3 benchmarks/ncu_decode.py 14336 4096 16 16 5 > "$F" 2>&1
  grep -E "Duration|Elapsed Cycles|Warp Cycles Per Issued|Issued Warp|No Eligible|Branch Instructions " "$F" | cut -c1-150
done
echo "=== end $(date +%T) ($SECONDS s)"
