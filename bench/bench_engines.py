"""Captioning on each engine, side by side: transformers' `generate` (vlmtune's default) and vLLM (`--engine
vllm`), on the same random-weight BLIP-2 and the same drawn images, greedy, a fixed number of new tokens.

    .venv-vllm/bin/python bench/bench_engines.py                 # CPU proxy, in the vLLM environment
    python bench/bench_engines.py --size real --images 512       # a GPU with vLLM installed

Needs vLLM (`make vllm-env` on a CPU machine). Each engine captions the images once to warm up (vLLM's
profiling run and graph capture, transformers' kernels), then again, timed; the captions of both are compared
(they agree under greedy decoding, token for token, as tests/test_vllm.py checks on trained models too).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))


def main() -> None:
    import bench

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=bench.SIZES, default="proxy")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64, help="images per transformers generate call")
    ap.add_argument("--new-tokens", type=int, default=20)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch

    from vlmtune.infer import Captioner

    dtype = "bfloat16" if args.size == "real" else "float32"
    images = [row["image"] for row in bench.rows(args.images, 1)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / f"blip2-{args.size}"
        bench.build_model(args.size, model_dir)
        results, captions = {}, {}
        for engine in ("transformers", "vllm"):
            captioner = Captioner.load(model=str(model_dir), dtype=dtype, engine=engine)
            kwargs = dict(batch_size=args.batch_size, max_new_tokens=args.new_tokens)
            captioner.caption(images, **kwargs)  # warm-up
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            captions[engine] = captioner.caption(images, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            results[engine] = len(images) / (time.perf_counter() - start)
            del captioner
    same = sum(a == b for a, b in zip(captions["transformers"], captions["vllm"], strict=True))
    print(f"machine: {bench.machine()}; model: {args.size} ({dtype}); {args.images} images, greedy\n")
    print("| engine       | images/s |")
    print("|--------------|----------|")
    for engine, rate in results.items():
        print(f"| {engine:12} | {rate:>8.2f} |")
    print(
        f"\nvllm: {results['vllm'] / results['transformers']:.2f}x transformers; same captions: {same} of {len(images)}"
    )


if __name__ == "__main__":
    main()
