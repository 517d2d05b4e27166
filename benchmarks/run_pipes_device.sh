#!/usr/bin/env bash
# Issue 4, session 21: each direction's merge + GEMM chunk pipeline per chunk size (can an L2-sized
# chunk make the merge's writes cheaper?) and the SM carveout with the next merge on a side stream
# (training_probe --pipes), at M = 4096 on 4096x14336 and 8192x28672.  Triton + cuBLAS only (no build).
#     OUT=$OUT bash benchmarks/run_pipes_device.sh      (carry .whl: the bitsandbytes wheel)
OUT="${OUT:-/tmp/lk_out}"; mkdir -p "$OUT"; TAG="${SESSION_TAG:-session21}"; ENV_S="${ENVELOPE:-300}"
set +e
NO_BUILD=1 source benchmarks/device_env.sh
GPU=$(python3 -c "import torch,re;print(re.sub('[^a-z0-9]+','-',torch.cuda.get_device_name().lower()).strip('-'))")
echo "=== $GPU $(date +%T) $(git rev-parse --short HEAD 2>/dev/null)"
timeout $(( ENV_S - SECONDS )) python3 -m benchmarks.training_probe --pipes --shapes ${SHAPES:-4096x14336,8192x28672} \
  --ms 4096 --rep-ms ${REP_MS:-40} --json "$OUT/probe_pipes_${GPU}_$TAG.json" > "$OUT/pipes.log" 2>&1
echo "rc=$?"; cut -c1-400 "$OUT/pipes.log" | tail -40
echo "=== end $(date +%T) ($SECONDS s)"
