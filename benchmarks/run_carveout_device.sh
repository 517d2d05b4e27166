#!/usr/bin/env bash
# Issue 4, session 21, one device call (no CUDA build: Triton + cuBLAS): (1) training_probe --pipes
# (chunk pipelines per chunk size; the SM carveout with the next merge beside the GEMM), (2) the GPU
# tests of the overlapped / carveout merge pipelines, (3) the step under CUDA-graph replay for
# AB_CONFIGS (default: default, carveout4, carveout8, fused, carveout4_fused, fwdchunk16), interleaved in rounds,
# at M = 4096 on SHAPES.   OUT=$OUT bash benchmarks/run_carveout_device.sh   (carry .whl)
OUT="${OUT:-/tmp/lk_out}"; mkdir -p "$OUT"; TAG="${SESSION_TAG:-session21}"; ENV_S="${ENVELOPE:-570}"
set +e
NO_BUILD=1 source benchmarks/device_env.sh
GPU=$(python3 -c "import torch,re;print(re.sub('[^a-z0-9]+','-',torch.cuda.get_device_name().lower()).strip('-'))")
echo "=== $GPU $(date +%T) $(git rev-parse --short HEAD 2>/dev/null)"
timeout ${PIPES_S:-200} python3 -m benchmarks.training_probe --pipes --shapes ${PIPE_SHAPES:-4096x14336,8192x28672} \
  --ms 4096 --rep-ms 40 --json "$OUT/probe_pipes_${GPU}_$TAG.json" > "$OUT/pipes.log" 2>&1
echo "pipes rc=$? ($SECONDS s)"; cut -c1-330 "$OUT/pipes.log" | tail -30
timeout 90 python3 -m pytest -m gpu -q -p no:cacheprovider -rf tests/test_autograd_gpu.py -k "carveout or overlapped" > "$OUT/gpu_tests_carveout.log" 2>&1
echo "pytest rc=$? ($SECONDS s)"; grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests_carveout.log" | tail -8 | cut -c1-250
export AB_CONFIGS="${AB_CONFIGS:-default,carveout4,carveout8,fused,carveout4_fused,fwdchunk16}"
timeout $(( ENV_S - SECONDS - 5 )) python3 -m benchmarks.training_probe --ab 3 --graph --shapes ${SHAPES:-4096x14336,8192x28672} \
  --ms 4096 --rep-ms 60 --json "$OUT/probe_training_ab_m4096_${GPU}_graph_carveout_$TAG.json" > "$OUT/ab.log" 2>&1
echo "ab rc=$? ($SECONDS s)"; cut -c1-1200 "$OUT/ab.log" | tail -6
echo "=== end $(date +%T) ($SECONDS s)"
