#!/usr/bin/env bash
# The GPU benchmark in one command: BLIP-2 OPT-2.7B dimensions, random weights, bf16. First vlmtune (image
# features cached, batch 64) beside the seed recipe as written (LLM.int8 + fp16, batch 2) and corrected by hand
# (bf16, batch 2); then vlmtune's step in steady state (100 timed optimizer steps after 10 of warm-up, the
# feature pass apart) at batch 64 and 256, with MFU per row and a profile of where a step goes.
# Needs CUDA, bitsandbytes (pip install -e '.[quant]'). The seeds' loops are timed on one epoch and 16 captions:
# their samples/s does not change with either (no cache, one image at a time), and at their speed 11 epochs
# would take most of the budget. Estimated from the last H200 run (154 samples/s at batch 64): ~4 minutes for
# the first part, ~4 for the second; not yet run in this form. With VARIANTS=1, a third part (~3 minutes more)
# compares the step with --packing and --lora-dtype base on captions of mixed length, side by side; with
# COMPILE=1 a fourth (~4 minutes, most of it compiling) the step with the model's own loss (--loss-chunk 0),
# compiled on padded shapes, and compiled with CUDA graphs (--compile-mode reduce-overhead), against the default.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/gpu_results.json}"
python bench/bench.py --size real --images 128 --epochs 11 --vlmtune-batch-size 64 --seed-epochs 1 \
  --caption-images 64 --caption-batch-size 64 --seed-caption-images 16 --json "$out"
python bench/bench_steady.py --size real --batch-sizes 64 256 --warmup 10 --steps 100 --profile-steps 5 \
  --json "${out%.json}_steady.json"
if [ "${VARIANTS:-0}" = 1 ]; then
  python bench/bench_steady.py --size real --captions mixed --batch-sizes 64 --warmup 10 --steps 50 \
    --profile-steps 0 --variants "max_length=128" "max_length=128,packing=true" \
    'max_length=128,packing=true,lora_dtype="base"' --json "${out%.json}_variants.json"
fi
if [ "${COMPILE:-0}" = 1 ]; then
  python bench/bench_steady.py --size real --batch-sizes 64 --warmup 10 --steps 50 --profile-steps 0 \
    --variants "" "loss_chunk=0" "compile=true" 'compile=true,compile_mode="reduce-overhead"' \
    --json "${out%.json}_compile.json"
fi
