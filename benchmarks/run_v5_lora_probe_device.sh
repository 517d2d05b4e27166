#!/usr/bin/env bash
# Where variant 5's low-rank term spends its time at M = 16 (issue 3; session 16 measured +10.5 us
# with r = 16 against r = 0 on both 8B MLP layers at M = 16, +1.7-3.6 us at M = 1): ncu of the GEMV
# and the finish kernel, separately (ncu serialises them, so the PDL overlap is gone and each
# duration is the kernel's own), at r = 0 and 16, M = 1 and 16, with the warp-stall breakdown; at
# M = 16, r = 16 also with the opt-in light-first piece map ($LORA_KERNELS_GEMV_V5_PIECES=light).
# One device call, ~2 min after the build.  Written in session 16 for the next session.
#     OUT=$OUT bash benchmarks/run_v5_lora_probe_device.sh      (carry .whl: the bitsandbytes wheel)
OUT="${OUT:-/tmp/lk_out}"; mkdir -p "$OUT"; TAG="${SESSION_TAG:-session17}"
set +e
source benchmarks/device_env.sh
command -v ncu > /dev/null || { echo "no ncu on this machine"; exit 0; }
SEC="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section LaunchStats"
for case in "4096 14336 1 0" "4096 14336 1 16" "4096 14336 16 0" "4096 14336 16 16" "4096 14336 16 16 light" \
            "14336 4096 16 0" "14336 4096 16 16" "14336 4096 16 16 light"; do
  set -- $case; PIECES="${5:-}"; F="$OUT/ncu_v5_lora_probe_${1}x${2}_m${3}_r${4}${PIECES:+_$PIECES}_$TAG.txt"
  echo "=== K=$1 N=$2 M=$3 r=$4 ${PIECES:+(LORA_KERNELS_GEMV_V5_PIECES=$PIECES) }$(date +%T)"
  LORA_KERNELS_GEMV_V5_PIECES=$PIECES LORA_KERNELS_GEMV_VARIANT=5 timeout 90 ncu --clock-control none -k "regex:nf4_gemv_v5_kernel|v5_finish_kernel" \
    --launch-skip 8 --launch-count 2 $SEC python3 benchmarks/ncu_decode.py $1 $2 $3 $4 5 > "$F" 2>&1
  grep -E "nf4_gemv_v5_kernel|v5_finish_kernel|Duration|Warp Cycles Per Issued|Registers Per Thread|Grid Size" "$F" | cut -c1-150
done
echo "=== end $(date +%T) ($SECONDS s)"
