#!/usr/bin/env bash
# GPU run for the fused forward and the training step: build (or reuse a carried _C_cuda build),
# the GPU tests named in $TESTS, a config sweep, the forward benchmark and/or the training
# benchmark ($TRAIN_ARGS).  Writes few files to $OUT.
#   STEPS="build tests probe sweep bench train" TESTS="tests/test_gpu_nf4.py" bash benchmarks/run_forward_device.sh
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || echo "no bitsandbytes wheel"
OUT=${OUT:-/tmp/lk_out}; mkdir -p "$OUT"
STEPS=${STEPS:-"build tests sweep bench"}
has() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }
if has build; then
  if ls .gpubuild/_C_cuda*.so >/dev/null 2>&1; then cp .gpubuild/_C_cuda*.so lora_kernels/ && echo "reusing carried _C_cuda";
  else
    T=$SECONDS
    LORA_KERNELS_CUDA_ARCHS=9.0 LORA_KERNELS_BUILD_CUDA=1 MAX_JOBS=16 timeout 300 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
      || { echo "build failed"; tail -30 "$OUT/build.log"; }
    echo "build $(( SECONDS - T )) s"; cp lora_kernels/_C_cuda*.so "$OUT/" 2>/dev/null
  fi
fi
python3 -c "import lora_kernels as lk, torch; print('backends on cuda:', lk.available_backends(torch.device('cuda')))"
if has tests; then
  timeout ${TEST_LIMIT:-150} python3 -m pytest -m gpu -q -rf --durations=8 ${TESTS:-tests} > "$OUT/gpu_tests.log" 2>&1
  echo "pytest rc=$?"; tail -25 "$OUT/gpu_tests.log"
fi
if has probe; then
  timeout ${PROBE_LIMIT:-120} python3 -m benchmarks.gemv_probe > "$OUT/probe.log" 2>&1; echo "probe rc=$?"; cat "$OUT/probe.log"
fi
if has sweep; then
  timeout ${SWEEP_LIMIT:-220} python3 -m benchmarks.bench_forward --quick --sweep --methods ours,bf16_linear \
    --ms ${SWEEP_MS:-1,16,4096} --out "$OUT" > "$OUT/sweep.log" 2>&1; echo "sweep rc=$?"
fi
if has bench; then
  timeout ${BENCH_LIMIT:-240} python3 -m benchmarks.bench_forward ${BENCH_ARGS:-} --out "$OUT" > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
fi
if has train; then
  timeout ${TRAIN_LIMIT:-300} python3 -m benchmarks.bench_training ${TRAIN_ARGS:-} --out "$OUT" > "$OUT/train.log" 2>&1
  echo "train rc=$?"
fi
echo "total $SECONDS s"
has sweep && grep -E "best|^!|Error" "$OUT/sweep.log" | tail -40
has bench && sed -n '/short table/,$p' "$OUT/bench.log" | cut -c1-130
has train && { grep -E "^ *!|check" "$OUT/train.log" | tail -20; sed -n '/short table/,$p' "$OUT/train.log" | cut -c1-170; }
