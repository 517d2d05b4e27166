#!/usr/bin/env bash
# The decode kernel's A/B on the GPU machine (issue 3), one device call of ENVELOPE s (default 560):
# build; tests/test_cuda_gemv.py on the GPU (TESTK: a pytest -k selection, default all); if it passes,
# variants 1 and 5 at M in MS (default 1,4,8,16), r = 0 / 16, with variant 5 also timed under each of
# V5ENV's settings (gemv_variants --v5-env, CUDA-graph replay; default: the finish kernel's old order and
# the plain piece map against the defaults); with the time left the decode forward beside
# bitsandbytes + PEFT at M in BENCH_MS (default 1,16).  Session 17's first call ran the equivalent of
# V5ENV=LORA_KERNELS_GEMV_V5_PIECES=light BENCH_MS=1,4,8,16 (then with --v5-light).
#     OUT=$OUT bash benchmarks/run_decode_ab_device.sh      (carry .whl: the bitsandbytes wheel)
#     TESTK="v5 or finish or piece" MS=1,16 ... (a shorter call)
OUT="${OUT:-/tmp/lk_out}"; mkdir -p "$OUT"; TAG="${SESSION_TAG:-session17b}"; ENV_S="${ENVELOPE:-560}"
V5ENV="${V5ENV-LORA_KERNELS_GEMV_V5_PIECES=slot,LORA_KERNELS_GEMV_V5_FINISH=plain}"
set +e
source benchmarks/device_env.sh
GPU=$(python3 -c "import torch,re;print(re.sub('[^a-z0-9]+','-',torch.cuda.get_device_name().lower()).strip('-'))")
echo "=== $GPU; git $(git rev-parse --short HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed"
echo "=== gemv tests $(date +%T)"
timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider -rf --maxfail=5 tests/test_cuda_gemv.py ${TESTK:+-k "$TESTK"} > "$OUT/gemv_tests.log" 2>&1; VRC=$?
echo "pytest rc=$VRC"; tail -3 "$OUT/gemv_tests.log" | cut -c1-250
if [ $VRC -ne 0 ]; then grep -E "^FAILED|^ERROR|Error" "$OUT/gemv_tests.log" | head -20 | cut -c1-300; echo "=== end $(date +%T) ($SECONDS s)"; exit 0; fi
echo "=== gemv_variants $(date +%T)"
timeout 240 python3 -m benchmarks.gemv_variants --ms ${MS:-1,4,8,16} --variants 1,5 ${V5ENV:+--v5-env "$V5ENV"} \
  --json "$OUT/gemv_variants_${GPU}_$TAG.json" > "$OUT/gemv_variants.log" 2>&1
echo "gemv_variants rc=$?"; grep -E "^\s+(4096x14336|14336x4096|8192x28672)|V5_" "$OUT/gemv_variants.log" | grep -v "^ *4096x4096" | cut -c1-130 | head -80
LEFT=$(( ENV_S - SECONDS ))
echo "=== decode bench ($LEFT s left) $(date +%T)"
if [ $LEFT -gt 45 ]; then
  timeout $LEFT python3 -m benchmarks.bench_forward --shapes 4096x14336,14336x4096,8192x28672 --ms ${BENCH_MS:-1,16} --methods ours,ours_layer,bnb_peft,bf16_linear --tag decode_$TAG --out "$OUT" > "$OUT/decode.log" 2>&1; echo "decode rc=$?"
  sed -n '/short table/,$p' "$OUT/decode.log" | grep -E "ours|bnb_peft" | cut -c1-150
fi
echo "=== end $(date +%T) ($SECONDS s)"
