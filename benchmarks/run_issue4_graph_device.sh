#!/usr/bin/env bash
# Issue 4's table under CUDA-graph replay beside the eager one, in one device call: bench_training on
# the four large layers (ours, bitsandbytes + PEFT, bf16 LoRA + PEFT, the cuBLAS pair) at M = $MS
# (default 4096), first --graph (tag issue4_graph_$SESSION_TAG), then eager (tag issue4_$SESSION_TAG).
# The step is GPU-bound at these sizes; the eager runs' ±0.2-0.5 ms spread hides 1-4 % changes.
#     OUT=$OUT bash benchmarks/run_issue4_graph_device.sh      (carry .whl: the bitsandbytes wheel)
OUT="${OUT:-/tmp/lk_out}"; mkdir -p "$OUT"; TAG="${SESSION_TAG:-session20}"
set +e
# no CUDA-extension build: at M >= 4096 the step is the Triton merge + cuBLAS
NO_BUILD=1; source benchmarks/device_env.sh
SH=${SHAPES:-4096x14336,14336x4096,8192x28672,28672x8192}
for MODE in graph eager; do
  echo "=== $MODE $(date +%T)"
  timeout ${LIMIT:-220} python3 -m benchmarks.bench_training --shapes $SH --ms ${MS:-4096} $([ $MODE = graph ] && echo --graph) \
    --tag "issue4_$([ $MODE = graph ] && echo graph_)$TAG" --out "$OUT" > "$OUT/train_$MODE.log" 2>&1
  echo "rc=$?"; sed -n '/short table/,$p' "$OUT/train_$MODE.log" | cut -c1-170 | grep -E "ours|cublas|KxN" | head -12
  grep -E "^ *!" "$OUT/train_$MODE.log" | head -5
done
echo "=== end $(date +%T) ($SECONDS s)"
