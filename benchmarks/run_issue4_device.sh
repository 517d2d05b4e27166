#!/usr/bin/env bash
# Issue 4's table at M = 4096 with the current defaults, in one device call (ENVELOPE s, default 540):
# build; the merge kernel's and the training path's GPU tests; bench_training (ours, bitsandbytes +
# PEFT, bf16 LoRA + PEFT, the cuBLAS floor) on the four large layers at M = 4096 (tag
# issue4_$SESSION_TAG); then training_probe --ab (AB_CONFIGS, interleaved rounds) with what is left.
# NO_BUILD=1 skips the CUDA extension's build; TESTS / TESTS_K pick the GPU tests.
#     OUT=$OUT bash benchmarks/run_issue4_device.sh      (carry .whl: the bitsandbytes wheel)
OUT="${OUT:-/tmp/lk_out}"; mkdir -p "$OUT"; TAG="${SESSION_TAG:-session19}"; ENV_S="${ENVELOPE:-540}"
set +e
source benchmarks/device_env.sh     # NO_BUILD=1: the M = 4096 step and the merge are Triton + cuBLAS
GPU=$(python3 -c "import torch,re;print(re.sub('[^a-z0-9]+','-',torch.cuda.get_device_name().lower()).strip('-'))")
SH=4096x14336,14336x4096,8192x28672,28672x8192
echo "=== train $GPU $(date +%T)"
timeout 200 python3 -m benchmarks.bench_training --shapes $SH --ms 4096 --tag "issue4_$TAG" --out "$OUT" > "$OUT/train.log" 2>&1
echo "train rc=$?"; sed -n '/short table/,$p' "$OUT/train.log" | cut -c1-170 | head -30
echo "=== tests $(date +%T)"
timeout 170 python3 -m pytest -m gpu -q -p no:cacheprovider -rf ${TESTS:-tests/test_triton_merge.py tests/test_autograd_gpu.py} \
  ${TESTS_K:+-k "$TESTS_K"} > "$OUT/gpu_tests.log" 2>&1
echo "pytest rc=$?"; grep -E "^FAILED|passed|failed" "$OUT/gpu_tests.log" | tail -8 | cut -c1-250
LEFT=$(( ENV_S - SECONDS - 5 ))
echo "=== ab M=4096 ($LEFT s left) $(date +%T)"
[ $LEFT -gt 40 ] && timeout $LEFT python3 -m benchmarks.training_probe --ab 4 --shapes $SH --ms 4096 --workspace-mb 64 \
  --rep-ms 80 --json "$OUT/probe_training_ab_m4096_${GPU}_${TAG}b.json" > "$OUT/training_ab.log" 2>&1
echo "rc=$?"; cut -c1-600 "$OUT/training_ab.log" | grep '^{' | tail -4
echo "=== end $(date +%T) ($SECONDS s)"
