#!/usr/bin/env bash
# The benchmark suite (issue 6) on the GPU machine, in one device command.  From the repo root:
#     bash benchmarks/run_suite_device.sh [full|quick]          (default full)
# carrying .whl (the bitsandbytes wheel) and, to skip the ~2-4 min CUDA build, .gpubuild (a
# prebuilt lora_kernels/_C_cuda*.so for this tree and this Python).
# Set-up (wheel, extension) takes what it takes; the suite gets the rest of a 590 s envelope, at most
# 540 s (full) / 110 s (quick), and shares it among its stages (python -m benchmarks.suite --plan).
# Returns two files in $OUT (the device returns at most 8): results.tgz — every result JSON/MD, the
# PNGs, SUMMARY.md, suite_<gpu>[_quick].json/.md/.log and build.log when it built — and
# suite_device.log, this script's own output.
set -o pipefail
export PYTHONUNBUFFERED=1
MODE="${1:-full}"
case "$MODE" in
  full)  SUITE_FLAGS="";        SUITE_MAX=540 ;;
  quick) SUITE_FLAGS="--quick"; SUITE_MAX=110 ;;
  *) echo "usage: $0 [full|quick]"; exit 2 ;;
esac
OUT="${OUT:-/tmp/lk_out}"
RES="$(mktemp -d /tmp/lk_suite.XXXXXX)"      # everything goes here first, then into one tarball
mkdir -p "$OUT"
ENVELOPE=${SUITE_ENVELOPE:-590}              # the device command's 600 s, less the tarball

main() {
echo "=== run_suite_device.sh $MODE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" \
  || echo "run_suite_device: no bitsandbytes wheel installed from .whl/ (the bitsandbytes columns will be skipped)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader \
  || echo "run_suite_device: nvidia-smi failed"

# --- the CUDA extension: the carried build if it loads, else build in place ----------------------
T=$SECONDS
has_cuda_ext() { python3 -c "import lora_kernels as lk, torch, sys; sys.exit(0 if 'cuda' in lk.available_backends(torch.device('cuda')) else 1)" 2>/dev/null; }
if ls .gpubuild/_C_cuda*.so >/dev/null 2>&1 && cp .gpubuild/_C_cuda*.so lora_kernels/ && has_cuda_ext; then
  echo "extension: reusing the carried $(ls .gpubuild/_C_cuda*.so | head -1)"
else
  echo "extension: no usable carried build; building (log: build.log in the tarball)"
  rm -f lora_kernels/_C_cuda*.so
  ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')"
  LORA_KERNELS_BUILD_CUDA=1 LORA_KERNELS_CUDA_ARCHS="${ARCH:-9.0}" MAX_JOBS=16 \
    timeout $(( ENVELOPE - SECONDS - 90 > 30 ? ENVELOPE - SECONDS - 90 : 30 )) \
    python3 setup.py build_ext --inplace > "$RES/build.log" 2>&1
  echo "build rc=$? ($(tail -1 "$RES/build.log" | cut -c1-120))"
fi
python3 -c "import lora_kernels as lk, torch; print('backends on cuda:', lk.available_backends(torch.device('cuda')))" 2>&1 | tail -2
echo "set-up took $(( SECONDS - T )) s (total so far $SECONDS s)"

# --- the suite -------------------------------------------------------------------------------------
BUDGET=$(( ENVELOPE - SECONDS - 10 ))
[ $BUDGET -gt $SUITE_MAX ] && BUDGET=$SUITE_MAX
if [ $BUDGET -lt 30 ]; then
  echo "run_suite_device: only $BUDGET s left for the suite: not started"
else
  echo "=== python -m benchmarks.suite $SUITE_FLAGS --budget-s $BUDGET --out $RES"
  T=$SECONDS
  timeout $(( BUDGET + 20 )) python3 -m benchmarks.suite $SUITE_FLAGS --budget-s "$BUDGET" --out "$RES"
  echo "suite rc=$? in $(( SECONDS - T )) s (0 all stages ok, 3 a stage cut or skipped, 1 a stage failed)"
fi

# --- one tarball -----------------------------------------------------------------------------------
rm -rf "$RES"/.staging_* 2>/dev/null
tar czf "$OUT/results.tgz" -C "$RES" . && echo "results.tgz: $(tar tzf "$OUT/results.tgz" | grep -c -v '/$') files, $(du -k "$OUT/results.tgz" | cut -f1) KiB"
echo "=== total $SECONDS s (device command limit 600 s)"
}

main 2>&1 | tee "$OUT/suite_device.log"
exit "${PIPESTATUS[0]}"
