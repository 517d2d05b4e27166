# Sourced by the device scripts: bitsandbytes from the carried wheel (.whl/), the environment, and the
# CUDA extension built (build log in $OUT/build.log; exits on a failed build).  Always built: on a warm
# machine the previous call's .so is still there but may predate the copied sources; the build is
# incremental, so an unchanged tree costs seconds.  Expects OUT set.  NO_BUILD=1: no build (Triton and
# cuBLAS paths only, e.g. the large-M training step and the merge kernel).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LORA_KERNELS_QUIET=1
if [ -z "$NO_BUILD" ]; then
  echo "=== build $(date +%T)"; _T=$SECONDS
  LORA_KERNELS_CUDA_ARCHS=9.0 LORA_KERNELS_BUILD_CUDA=1 MAX_JOBS=16 \
    timeout 300 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -20 "$OUT/build.log"; exit 1; }
  echo "build $(( SECONDS - _T )) s"
fi
