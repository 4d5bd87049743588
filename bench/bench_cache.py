"""The image-feature cache pass with one process and with several, in memory and too big for memory (a file):
seconds, what is left on disk, and each process's peak memory, side by side, each row in a run of its own.

    python bench/bench_cache.py                      # CPU proxy, 1 and 2 processes (gloo), about a minute
    python bench/bench_cache.py --processes 1 8      # a machine with 8 GPUs

Every row keeps the features with `--feature-cache-dir` (a sweep's first run) and caches the vision encoder's
output (`--train-qformer`'s cache, the bigger one: 257 x 192 floats an image on the proxy). "disk" rows set the
host- and device-memory limits to zero, as if the features were too big for memory. `on disk` counts every
file under the run and keep directories once the pass is over; the table ends with one line per tier: the
pass's samples/s with the most processes over one process's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))


def one(args: argparse.Namespace) -> None:
    """One row, in each process that torchrun started."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vlmtune.training.cache as cache
    from vlmtune.data.batching import Collator
    from vlmtune.data.examples import CaptionExamples
    from vlmtune.data.sources import load_splits
    from vlmtune.families import family_for

    accelerator = Accelerator()
    model = AutoModelForImageTextToText.from_pretrained(args.model_dir).to(accelerator.device)
    processor = AutoProcessor.from_pretrained(args.model_dir)
    family = family_for(model.config)
    if args.one == "disk":
        cache.HOST_LIMIT = cache.ON_DEVICE_LIMIT = 0
    examples = CaptionExamples(load_splits(args.data_dir)[0], per_image=True)
    out = Path(args.out)
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    features, said = cache.kept_features(
        model,
        family,
        Collator(family, processor, 48),
        examples,
        dtype=torch.float32,
        accelerator=accelerator,
        keep_dir=out / "keep",
        upto="vision",
        batch_size=16,
        spill_dir=out / "run",
    )
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - start
    assert said.startswith("kept"), said
    peaks = gather_object([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20])
    if accelerator.is_main_process:
        files = [p for p in out.rglob("*") if p.is_file()]
        row = {
            "samples_per_s": len(examples) / seconds,
            "files": sum(p.suffix == ".npy" for p in files),  # of features (beside them: their images' sizes)
            "disk_gib": sum(p.stat().st_size for p in files) / 2**30,
            "cache_gib": features[torch.tensor([0])].nbytes * len(examples) / 2**30,
            "peak_gib": max(peaks),
        }
        print(json.dumps(row))
    accelerator.end_training()  # a process group left to exit-time destructors can abort the process


def measure(tier: str, processes: int, args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"{tier}-{processes}"
    (out / "run").mkdir(parents=True)  # as the run directory is, when the cache is built
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd += [__file__, "--one", tier, "--out", str(out)]
    cmd += ["--model-dir", args.model_dir, "--data-dir", args.data_dir]
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // processes)))
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    print(f"[bench] {tier}, {processes} process(es) ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
        raise SystemExit(f"{tier} x {processes} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tiers", nargs="+", choices=("memory", "disk"), default=["memory", "disk"])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)

    from bench import build_model, machine

    from vlmtune.data.synthetic import write_football_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        args.model_dir = str(tmp / "blip2-proxy")
        build_model("proxy", Path(args.model_dir))
        args.data_dir = str(write_football_dataset(tmp / "football", {"train": (args.images, 0)}))
        results = {(t, k): measure(t, k, args, tmp) for t in args.tiers for k in args.processes}
    print(f"machine: {machine()}; {args.images} images, the vision encoder's output cached in fp32\n")
    print("| tier   | processes | samples/s | files | on disk GiB | cache GiB | peak GiB per process |")
    print("|--------|-----------|-----------|-------|-------------|-----------|----------------------|")
    for (tier, k), r in results.items():
        print(
            f"| {tier:6} | {k:>9} | {r['samples_per_s']:>9.1f} | {r['files']:>5} | {r['disk_gib']:>11.3f} "
            f"| {r['cache_gib']:>9.3f} | {r['peak_gib']:>20.2f} |"
        )
    print()
    most, least = max(args.processes), min(args.processes)
    for tier in args.tiers:
        ratio = results[tier, most]["samples_per_s"] / results[tier, least]["samples_per_s"]
        print(f"{tier}, {most} processes over {least}: {ratio:.1f}x")


if __name__ == "__main__":
    main()
