#!/usr/bin/env bash
# Issue 3's open question, in one device call: where decode variant 5's warps stall.  ncu with
# --print-details all (the per-reason stall table the section summaries leave out) on a warm call of
# nf4_gemv_v5 at 14336x4096 M = 16 r = 16 under both piece maps (slot, light), then 4096x14336 at
# M = 1 and 16 (the 8B layer issue 3 measures at 2.0-2.3x its memory floor).  Builds the CUDA
# extension first unless the warm machine has it.  Files: $OUT/ncu_v5_stalls_*_$SESSION_TAG.txt
#     OUT=$OUT bash benchmarks/run_v5_stalls_device.sh      (carry .whl: the bitsandbytes wheel)
OUT="${OUT:-/tmp/lk_out}"; mkdir -p "$OUT"; TAG="${SESSION_TAG:-session21}"; ENV_S="${ENVELOPE:-540}"
set +e
source benchmarks/device_env.sh
command -v ncu > /dev/null || { echo "no ncu"; exit 0; }
SEC="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section SourceCounters --print-details all"
for CASE in "14336 4096 16 slot" "14336 4096 16 light" "4096 14336 1 default" "4096 14336 16 default"; do
  set -- $CASE; K=$1; N=$2; M=$3; PIECES=$4
  LEFT=$(( ENV_S - SECONDS )); [ $LEFT -gt 40 ] || break
  F="$OUT/ncu_v5_stalls_${K}x${N}_m${M}_r16_${PIECES}_$TAG.txt"; echo "=== ncu $CASE ($LEFT s left) $(date +%T)"
  ( [ "$PIECES" = default ] || export LORA_KERNELS_GEMV_V5_PIECES=$PIECES
    LORA_KERNELS_GEMV_VARIANT=5 timeout $(( LEFT - 10 )) ncu --clock-control none -k "regex:nf4_gemv_v5_kernel" \
      --launch-skip 8 --launch-count 1 $SEC python3 benchmarks/ncu_decode.py $K $N $M 16 5 > "$F" 2>&1 )
  grep -E "Duration|Warp Cycles Per Issued|Stall|stall" "$F" | head -30 | cut -c1-160
done
echo "=== end $(date +%T) ($SECONDS s)"
