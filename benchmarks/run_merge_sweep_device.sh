#!/usr/bin/env bash
# The merge kernel's tile sweep (training_probe --merge-sweep: SWEEP_TILES x K_FASTEST, whole weight
# and as the step's 64 MB chunks), then the eager step with the fastest against the default, on
# issue 4's four large layers at M = 4096, in one device call (ENVELOPE s, default 540).
#     OUT=$OUT bash benchmarks/run_merge_sweep_device.sh      (carry .whl: the bitsandbytes wheel)
OUT="${OUT:-/tmp/lk_out}"; mkdir -p "$OUT"; TAG="${SESSION_TAG:-session19}"; ENV_S="${ENVELOPE:-540}"
set +e
# no CUDA-extension build: the merge, the step's GEMMs and its LoRA kernels are Triton and cuBLAS
NO_BUILD=1; source benchmarks/device_env.sh
GPU=$(python3 -c "import torch,re;print(re.sub('[^a-z0-9]+','-',torch.cuda.get_device_name().lower()).strip('-'))")
echo "=== sweep $GPU $(date +%T)"
timeout $(( ENV_S - SECONDS - 5 )) python3 -m benchmarks.training_probe --merge-sweep ${ROUNDS:-4} \
  --shapes ${SHAPES:-8192x28672,28672x8192,4096x14336,14336x4096} --ms 4096 --rep-ms 60 \
  --json "$OUT/probe_merge_sweep_${GPU}_$TAG.json" > "$OUT/merge_sweep.log" 2>&1
echo "rc=$?"; grep -v '^{"BLOCK_N' "$OUT/merge_sweep.log" | cut -c1-700 | tail -6
echo "=== end $(date +%T) ($SECONDS s)"
