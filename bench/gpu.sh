#!/usr/bin/env bash
# The GPU benchmark in one command (under 8 minutes on an H100/H200): BLIP-2 OPT-2.7B dimensions, random
# weights, bf16; vlmtune (image features cached, batch 64) beside the seed recipe (LLM.int8 + fp16, batch 2).
# Needs CUDA, bitsandbytes (pip install -e '.[quant]'). The seed's loop is timed on one epoch and 16 captions:
# its samples/s does not change with either (no cache, one image at a time), and at its speed 11 epochs
# would take most of the budget. `--data memory`: both get plain rows, as `datasets` may not be installed there.
set -euo pipefail
cd "$(dirname "$0")/.."
python bench/bench.py --size real --data memory --images 128 --epochs 11 --vlmtune-batch-size 64 --seed-epochs 1 \
  --caption-images 64 --caption-batch-size 64 --seed-caption-images 16 --json "${1:-bench/gpu_results.json}"
