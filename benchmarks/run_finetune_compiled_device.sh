#!/usr/bin/env bash
# The compiled, graph-replayed fine-tune on the GPU machine (issue 5; benchmarks/NOTES.md, session
# 10's "Next"), in priority order, one device call.  Run from the repo root:
#     bash benchmarks/run_finetune_compiled_device.sh
# Writes bench_finetune's JSON/markdown files to $OUT (default /tmp/lk_out), each rewritten after
# every arm, so a step cut by its time limit keeps the arms it finished.  No CUDA build needed.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
  || echo "run_finetune_compiled_device: no bitsandbytes wheel in .whl/ (the peft_bnb arm will fail)"
export PYTHONUNBUFFERED=1 LORA_KERNELS_QUIET=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/lk_out}"
mkdir -p "$OUT"
PAT="tokens/s|wrote|rror|skipping cudagraph"
COMMON="--compile --compile-mode reduce-overhead --optim fused --out $OUT"
python3 -c "import torch, triton, peft, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name(0))"
echo "=== GPU test of the compiled step $(date +%T)"
timeout 90 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_autograd_gpu.py -k reduce_overhead 2>&1 | tail -3
echo "=== 1.1B batch 8, all arms $(date +%T)"
timeout 330 python3 -m benchmarks.bench_finetune --model 1b --batch 8 --steps 7 --warmup 3 --arms peft_bnb,ours,ours_fused $COMMON 2>&1 | grep -E "$PAT"
echo "=== demo, all arms $(date +%T)"
timeout 120 python3 -m benchmarks.bench_finetune --model demo --steps 14 --warmup 4 $COMMON 2>&1 | grep -E "$PAT"
echo "=== end $(date +%T)"; ls "$OUT"
