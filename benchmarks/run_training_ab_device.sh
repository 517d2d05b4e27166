#!/usr/bin/env bash
# Issue 4's opt-in A/B in one device call, ENVELOPE s (default 560; session 18's 230 s call finished
# one shape of the M = 4096 part): build; the merge kernel's tile-config GPU tests; then the step
# under the opt-ins (LORA_KERNELS_MERGE_OVERLAP, LORA_KERNELS_FUSED_DY_PASS, the merge's tile by
# rank) against the default (training_probe.AB_CONFIGS), interleaved in rounds
# (training_probe --ab, which also times the merge kernel's tiles in MERGE_SWEEP),
# at M = 4096 with the workspaces in WSMB (default 64 MB), then M = 16384.  GRAPH=1 times the step by
# CUDA-graph replay (training_probe --ab --graph; the overlap config is left out there) and tags the
# files ..._graph_$SESSION_TAG; NO_BUILD=1 skips the CUDA extension (the M >= 4096 step is Triton + cuBLAS).
#     OUT=$OUT bash benchmarks/run_training_ab_device.sh      (carry .whl: the bitsandbytes wheel)
OUT="${OUT:-/tmp/lk_out}"; mkdir -p "$OUT"; TAG="${GRAPH:+graph_}${SESSION_TAG:-session21}"; ENV_S="${ENVELOPE:-560}"
set +e
source benchmarks/device_env.sh
GPU=$(python3 -c "import torch,re;print(re.sub('[^a-z0-9]+','-',torch.cuda.get_device_name().lower()).strip('-'))")
echo "=== $GPU $(date +%T)"
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider -rf tests/test_triton_merge.py -k "fastest or no_lora or rank" > "$OUT/gpu_tests.log" 2>&1
echo "pytest rc=$?"; tail -1 "$OUT/gpu_tests.log" | cut -c1-200
SH=8192x28672,4096x14336,28672x8192,14336x4096
echo "=== ab M=4096 $(date +%T)"
timeout $(( ENV_S - SECONDS - 60 )) python3 -m benchmarks.training_probe --ab 3 ${GRAPH:+--graph} --shapes $SH --ms 4096 --workspace-mb ${WSMB:-64} \
  --rep-ms 80 --json "$OUT/probe_training_ab_m4096_${GPU}_$TAG.json" > "$OUT/training_ab_m4096.log" 2>&1
echo "rc=$?"; cut -c1-900 "$OUT/training_ab_m4096.log" | tail -8
LEFT=$(( ENV_S - SECONDS - 5 ))
echo "=== ab M=16384 ($LEFT s left) $(date +%T)"
[ $LEFT -gt 30 ] && timeout $LEFT python3 -m benchmarks.training_probe --ab 2 ${GRAPH:+--graph} --shapes $SH --ms 16384 --workspace-mb 64 \
  --rep-ms 80 --json "$OUT/probe_training_ab_m16384_${GPU}_$TAG.json" > "$OUT/training_ab_m16384.log" 2>&1
echo "rc=$?"; cut -c1-900 "$OUT/training_ab_m16384.log" | tail -4
echo "=== end $(date +%T) ($SECONDS s)"
