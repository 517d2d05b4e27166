#!/usr/bin/env bash
# The one script for the GPU machine: install the carried bitsandbytes wheel, build lora_kernels
# in place with CUDA, run the GPU tests, the benchmarks and the report.  Run from the repo root:
#     bash benchmarks/run_device.sh [quick|full]
# Writes to $OUT (default /tmp/lk_out), at most 7 files, no subfolders:
#   build.log  gpu_tests.log  bench.log  nf4_<gpu>[_quick].json/.md  nf4_<gpu>[_quick].png  SUMMARY.md
# Everything fits in ~9 minutes (each step has its own time limit); the short tables print last.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH || echo "run_device: no bitsandbytes wheel installed from .whl/ (the bnb columns will be skipped)"

set -o pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export LORA_KERNELS_QUIET=0
MODE="${1:-quick}"
case "$MODE" in
  quick) BENCH_FLAGS="--quick" ;;
  full)  BENCH_FLAGS="" ;;
  *) echo "usage: $0 [quick|full]"; exit 2 ;;
esac
OUT="${OUT:-/tmp/lk_out}"
mkdir -p "$OUT"
TOTAL=540                       # seconds for the whole script
left() { echo $(( TOTAL - SECONDS )); }

echo "=== run_device.sh $MODE (out: $OUT)"
nvidia-smi || echo "run_device: nvidia-smi failed"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
python3 -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>&1 | tail -1

# --- build (in place, CUDA forced, only this GPU's architecture) -----------------------------------
ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')"
export LORA_KERNELS_CUDA_ARCHS="${LORA_KERNELS_CUDA_ARCHS:-${ARCH:-9.0}}"
export MAX_JOBS="${MAX_JOBS:-16}"
echo "=== build (archs $LORA_KERNELS_CUDA_ARCHS), log: $OUT/build.log"
T=$SECONDS
LORA_KERNELS_BUILD_CUDA=1 timeout 270 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
RC=$?
if [ $RC -ne 0 ]; then
  echo "run_device: setup.py build_ext --inplace failed (rc $RC); trying pip install -e" | tee -a "$OUT/build.log"
  LORA_KERNELS_BUILD_CUDA=1 timeout $(( $(left) > 300 ? 200 : 60 )) \
    python3 -m pip install --no-build-isolation --no-deps --no-index -e . >> "$OUT/build.log" 2>&1
  RC=$?
fi
tail -30 "$OUT/build.log"
echo "build rc=$RC in $(( SECONDS - T )) s"
python3 -c "import lora_kernels as lk, torch; print('backends on cuda:', lk.available_backends(torch.device('cuda')))" 2>&1 | tail -3

# --- GPU tests (the run goes on when they fail) ----------------------------------------------------
TEST_MAX=${TEST_LIMIT_MAX:-240}
TEST_LIMIT=$(( $(left) - 200 )); [ $TEST_LIMIT -gt $TEST_MAX ] && TEST_LIMIT=$TEST_MAX
if [ $TEST_LIMIT -gt 20 ]; then
  TIMEOUT_FLAG=""
  python3 -c "import pytest_timeout" 2>/dev/null && TIMEOUT_FLAG="--timeout=300"
  echo "=== pytest -m gpu (limit ${TEST_LIMIT}s), log: $OUT/gpu_tests.log"
  timeout $TEST_LIMIT python3 -m pytest -m gpu -q -rf --durations=12 $TIMEOUT_FLAG ${PYTEST_ARGS:-} tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
  echo "pytest rc=$?"
else
  echo "run_device: no time left for the GPU tests" | tee "$OUT/gpu_tests.log"
fi

# --- benchmarks -----------------------------------------------------------------------------------
BENCH_LIMIT=$(( $(left) - 25 ))
echo "=== bench_nf4 $BENCH_FLAGS (limit ${BENCH_LIMIT}s), log: $OUT/bench.log"
if [ $BENCH_LIMIT -gt 20 ]; then
  timeout $BENCH_LIMIT python3 -m benchmarks.bench_nf4 $BENCH_FLAGS --out "$OUT" > "$OUT/bench.log" 2>&1
  echo "bench_nf4 rc=$? (results are written after every shape)"
else
  echo "run_device: no time left for the benchmarks" | tee "$OUT/bench.log"
fi

# --- report ----------------------------------------------------------------------------------------
timeout 20 python3 -m benchmarks.report --results "$OUT" 2>&1 | tail -5

# --- short tables last ----------------------------------------------------------------------------
echo
echo "=== bench log (without the table), then the tables; total $SECONDS s"
grep -v -e '^== short table' "$OUT/bench.log" | sed -n '1,/^wrote /p' | tail -15
echo "--- gpu tests: $(grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$OUT/gpu_tests.log" | tail -1)"
sed -n '/^== short table/,$p' "$OUT/bench.log"
