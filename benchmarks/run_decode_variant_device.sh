#!/usr/bin/env bash
# A new decode kernel variant V on the GPU machine (issue 3), one device call (ENVELOPE s, default 540):
# build with CUDA (~1.5 min); the variant's GPU tests; if they fail, gemv_variants --diagnose V (where
# it differs; comes back in $OUT) and nothing else; if they pass, the A/B against the variants the
# dispatcher uses today (gemv_variants, CUDA-graph replay), ncu of V on the 8B MLP layer at M = 1, and
# with the time left the decode forward bench with V forced beside bitsandbytes + PEFT and F.linear.
# Session 13 ran this for variant 4 (then named run_decode_v4_device.sh); session 14 for variant 5.
#     VARIANT=5 OUT=$OUT bash benchmarks/run_decode_variant_device.sh      (carry .whl: the bitsandbytes wheel)
OUT="${OUT:-/tmp/lk_out}"; mkdir -p "$OUT"
V="${VARIANT:-5}"; TAG="${SESSION_TAG:-session14}"; ENV_S="${ENVELOPE:-540}"
set +e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LORA_KERNELS_QUIET=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
echo "=== build $(date +%T)"; T=$SECONDS
LORA_KERNELS_CUDA_ARCHS=9.0 LORA_KERNELS_BUILD_CUDA=1 MAX_JOBS=16 timeout 300 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1 || { echo "build failed"; grep -E "error|Error" $OUT/build.log | head -30; }
echo "build $(( SECONDS - T )) s"
python3 -c "import torch, lora_kernels as lk; from lora_kernels import _ext; e=_ext.cuda_ext(); print(torch.__version__, torch.cuda.get_device_name(0), lk.available_backends(torch.device('cuda')), 'v$V built:', lk.library.gemv_variant_built($V))"
echo "=== v$V tests $(date +%T)"
timeout 170 python3 -m pytest -m gpu -q -p no:cacheprovider -rf --maxfail=5 tests/test_cuda_gemv.py -k "v$V or variants_agree" > $OUT/gemv_tests.log 2>&1; VRC=$?; echo "pytest rc=$VRC"; tail -12 $OUT/gemv_tests.log | cut -c1-300
if [ $VRC -ne 0 ]; then   # it failed its tests: where does it differ, then stop (the other variants are measured)
  echo "=== diagnose v$V $(date +%T)"
  CUDA_LAUNCH_BLOCKING=1 timeout 90 python3 -m benchmarks.gemv_variants --diagnose $V --ms 1,3,8 > $OUT/v${V}_diagnose.log 2>&1
  tail -30 $OUT/v${V}_diagnose.log | cut -c1-300
  echo "=== end $(date +%T) ($SECONDS s)"; exit 0
fi
echo "=== gemv_variants $(date +%T)"
timeout 200 python3 -m benchmarks.gemv_variants --ms 1,8,16 --variants 1,2,3,$V --json $OUT/gemv_variants_$TAG.json 2>&1 | tail -30
echo "=== ncu v$V $(date +%T)"
if command -v ncu > /dev/null && [ $(( ENV_S - SECONDS )) -gt 150 ]; then
  SEC="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats"
  timeout 60 ncu --clock-control none -k regex:nf4_gemv_v${V}_kernel --launch-skip 6 --launch-count 1 $SEC python3 benchmarks/ncu_decode.py 4096 14336 1 16 $V > $OUT/ncu_gemv_v${V}_4096x14336_m1_$TAG.txt 2>&1
  grep -E "Duration|DRAM Throughput|Issue Slots Busy|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Grid Size|Dynamic Shared|Issued Ipc|Eligible" $OUT/ncu_gemv_v${V}_4096x14336_m1_$TAG.txt | head -16
fi
LEFT=$(( ENV_S - SECONDS ))
echo "=== decode bench, v$V forced ($LEFT s left) $(date +%T)"
if [ $LEFT -gt 60 ]; then
  LORA_KERNELS_GEMV_VARIANT=$V timeout $LEFT python3 -m benchmarks.bench_forward --shapes 4096x14336,14336x4096,8192x28672,28672x8192 --ms 1,16 --methods ours,ours_layer,bnb_peft,bf16_linear --tag decode_v${V}_$TAG --out $OUT > $OUT/decode.log 2>&1; echo "decode rc=$?"
  sed -n '/short table/,$p' $OUT/decode.log | cut -c1-150
fi
echo "=== end $(date +%T) ($SECONDS s)"
