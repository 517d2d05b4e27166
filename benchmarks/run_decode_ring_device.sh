#!/usr/bin/env bash
# Variant 5's session-15 additions on the GPU machine (issue 3), one device call (ENVELOPE s, default
# 560): build; the v5 GPU tests (M up to 16, x per K slice, the opt-in deep ring
# $LORA_KERNELS_GEMV_V5_STAGES=6); if they pass, the A/B of variants 1, 3 and 5 at M = 1, 4, 8, 16 plus
# v5 with the deep ring (gemv_variants --v5-deep, CUDA-graph replay; v5_mode 2 = x per K slice), ncu
# of v5 at 4096x14336, M = 1, r = 16 with each ring, and with the time left the decode forward beside
# bitsandbytes + PEFT.  Written in session 15 for the next session.
#     OUT=$OUT bash benchmarks/run_decode_ring_device.sh      (carry .whl: the bitsandbytes wheel)
OUT="${OUT:-/tmp/lk_out}"; mkdir -p "$OUT"; TAG="${SESSION_TAG:-session16}"; ENV_S="${ENVELOPE:-560}"
set +e
source benchmarks/device_env.sh
echo "=== v5 tests $(date +%T)"
timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider -rf --maxfail=5 tests/test_cuda_gemv.py \
  -k "v5 or deep or variants_agree or decode_fast or binding_takes" > "$OUT/gemv_tests.log" 2>&1; VRC=$?
echo "pytest rc=$VRC"; tail -4 "$OUT/gemv_tests.log" | cut -c1-250
if [ $VRC -ne 0 ]; then
  grep -E "^FAILED" "$OUT/gemv_tests.log" | head -20 | cut -c1-250
  CUDA_LAUNCH_BLOCKING=1 timeout 60 python3 -m benchmarks.gemv_variants --diagnose 5 --ms 1,3,8 > "$OUT/v5_diagnose.log" 2>&1
  LORA_KERNELS_GEMV_V5_STAGES=6 CUDA_LAUNCH_BLOCKING=1 timeout 60 python3 -m benchmarks.gemv_variants --diagnose 5 --ms 1,3 >> "$OUT/v5_diagnose.log" 2>&1
  tail -20 "$OUT/v5_diagnose.log" | cut -c1-250; echo "=== end $(date +%T) ($SECONDS s)"; exit 0
fi
echo "=== gemv_variants $(date +%T)"
timeout 200 python3 -m benchmarks.gemv_variants --ms 1,4,8,16 --variants 1,3,5 --v5-deep --json "$OUT/gemv_variants_nvidia-h100-80gb-hbm3_$TAG.json" 2>&1 | tail -40 | cut -c1-200
if command -v ncu > /dev/null && [ $(( ENV_S - SECONDS )) -gt 150 ]; then
  SEC="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy"
  for st in 4 6; do
    echo "=== ncu v5, $st stages $(date +%T)"
    LORA_KERNELS_GEMV_V5_STAGES=$st timeout 60 ncu --clock-control none -k regex:nf4_gemv_v5_kernel --launch-skip 6 --launch-count 1 $SEC \
      python3 benchmarks/ncu_decode.py 4096 14336 1 16 5 > "$OUT/ncu_gemv_v5_${st}stages_4096x14336_m1_$TAG.txt" 2>&1
    grep -E "Duration|DRAM Throughput|Issue Slots Busy|Eligible Warps|Warp Cycles Per Issued|Dynamic Shared" "$OUT/ncu_gemv_v5_${st}stages_4096x14336_m1_$TAG.txt" | head -8
  done
fi
LEFT=$(( ENV_S - SECONDS ))
echo "=== decode bench ($LEFT s left) $(date +%T)"
if [ $LEFT -gt 50 ]; then
  timeout $LEFT python3 -m benchmarks.bench_forward --shapes 4096x14336,14336x4096,8192x28672 --ms 1,16 --methods ours,ours_layer,bnb_peft,bf16_linear --tag decode_$TAG --out "$OUT" > "$OUT/decode.log" 2>&1; echo "decode rc=$?"
  sed -n '/short table/,$p' "$OUT/decode.log" | cut -c1-150
fi
echo "=== end $(date +%T) ($SECONDS s)"
