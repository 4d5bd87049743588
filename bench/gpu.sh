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
#
# SMOKE=1 runs every part on the CPU proxy with a few images and steps: the same commands and settings, to
# check the script's wiring before device time is spent on it (tests/test_bench.py runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/gpu_results.json}"
size=real images=128 epochs=11 batch=64 captions=64 seed_captions=16 batches="64 256" warmup=10 steps=100
profile=5 variant_steps=50
if [ "${SMOKE:-0}" = 1 ]; then
  size=proxy images=4 epochs=1 batch=4 captions=4 seed_captions=2 batches="2 4" warmup=1 steps=2 profile=1
  variant_steps=2
fi
python bench/bench.py --size "$size" --images "$images" --epochs "$epochs" --vlmtune-batch-size "$batch" \
  --seed-epochs 1 --caption-images "$captions" --caption-batch-size "$batch" \
  --seed-caption-images "$seed_captions" --json "$out"
# shellcheck disable=SC2086  # the batch sizes are words
python bench/bench_steady.py --size "$size" --batch-sizes $batches --warmup "$warmup" --steps "$steps" \
  --profile-steps "$profile" --json "${out%.json}_steady.json"
if [ "${VARIANTS:-0}" = 1 ]; then
  python bench/bench_steady.py --size "$size" --captions mixed --batch-sizes "$batch" --warmup "$warmup" \
    --steps "$variant_steps" --profile-steps 0 --variants "max_length=128" "max_length=128,packing=true" \
    'max_length=128,packing=true,lora_dtype="base"' --json "${out%.json}_variants.json"
fi
if [ "${COMPILE:-0}" = 1 ]; then
  python bench/bench_steady.py --size "$size" --batch-sizes "$batch" --warmup "$warmup" \
    --steps "$variant_steps" --profile-steps 0 \
    --variants "" "loss_chunk=0" "compile=true" 'compile=true,compile_mode="reduce-overhead"' \
    --json "${out%.json}_compile.json"
fi
