#!/usr/bin/env bash
# Decode variant 4 on the GPU machine (issue 3; benchmarks/NOTES.md "Session 11"), one device call:
# build with CUDA (~1 min), the v4 GPU tests, the v1..v4 A/B (gemv_variants), then, with time left
# (ENVELOPE s, default 530), the decode forward bench with variant 4 forced beside bitsandbytes + PEFT
# (skipped if the v4 tests fail), then issue 4's training step if time is still left.
#     OUT=$OUT bash benchmarks/run_decode_v4_device.sh      (carry .whl: the bitsandbytes wheel)
OUT="${OUT:-/tmp/lk_out}"; mkdir -p "$OUT"
set +e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LORA_KERNELS_QUIET=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
echo "=== build $(date +%T)"; T=$SECONDS
LORA_KERNELS_CUDA_ARCHS=9.0 LORA_KERNELS_BUILD_CUDA=1 MAX_JOBS=16 timeout 300 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1 || { echo "build failed"; grep -E "error|Error" $OUT/build.log | head -30; }
echo "build $(( SECONDS - T )) s"; cp lora_kernels/_C_cuda*.so $OUT/ 2>/dev/null
python3 -c "import torch, lora_kernels as lk; from lora_kernels import _ext; e=_ext.cuda_ext(); print(torch.__version__, torch.cuda.get_device_name(0), lk.available_backends(torch.device('cuda')), 'v4' , hasattr(e,'lora_gemv_v4_supported'))"
echo "=== v4 tests $(date +%T)"
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider -rf --maxfail=3 tests/test_cuda_gemv.py -k "v4 or variants_agree" > $OUT/gemv_tests.log 2>&1; V4RC=$?; echo "pytest rc=$V4RC"; tail -8 $OUT/gemv_tests.log
echo "=== gemv_variants $(date +%T)"
VS=1,2,3,4
if [ $V4RC -ne 0 ]; then   # v4 failed its tests: where does it differ (comes back in $OUT), and time v1..v3 only
  VS=1,2,3; CUDA_LAUNCH_BLOCKING=1 timeout 60 python3 -m benchmarks.gemv_variants --diagnose 4 --ms 1,3,8,16 > $OUT/v4_diagnose.log 2>&1
  tail -25 $OUT/v4_diagnose.log
fi
timeout 120 python3 -m benchmarks.gemv_variants --ms 1,16 --variants $VS --json $OUT/gemv_variants.json 2>&1 | tail -22
LEFT=$(( ${ENVELOPE:-530} - SECONDS ))
echo "=== decode bench, v4 forced ($LEFT s left) $(date +%T)"
if [ $V4RC -ne 0 ]; then echo "v4 tests failed: no v4-forced bench"; elif [ $LEFT -gt 60 ]; then
  DT=$LEFT; [ $LEFT -gt 300 ] && DT=$(( LEFT - 110 ))    # leave the training step ~110 s when there is room
  LORA_KERNELS_GEMV_VARIANT=4 timeout $DT python3 -m benchmarks.bench_forward --shapes 4096x14336,14336x4096,8192x28672,28672x8192 --ms 1,16 --methods ours,ours_layer,bnb_peft,bf16_linear --tag decode_v4_${SESSION_TAG:-session13} --out $OUT > $OUT/decode.log 2>&1; echo "decode rc=$?"
  sed -n '/short table/,$p' $OUT/decode.log | cut -c1-150
fi
LEFT=$(( ${ENVELOPE:-530} - SECONDS ))
echo "=== training step, issue 4 ($LEFT s left) $(date +%T)"
if [ $LEFT -gt 100 ]; then
  timeout $LEFT python3 -m benchmarks.bench_training --shapes 4096x4096,4096x1024,4096x14336,14336x4096,8192x28672,28672x8192 --ms 4096,16384 --directions step --tag issue4_${SESSION_TAG:-session13} --out $OUT > $OUT/train.log 2>&1; echo "train rc=$?"
  sed -n '/short table/,$p' $OUT/train.log | cut -c1-170
fi
echo "=== end $(date +%T) ($SECONDS s)"
