"""vlmtune's training step in steady state: samples/s and MFU per batch size, and where a step's time goes.

    python bench/bench_steady.py                          # CPU proxy (BLIP-2's shape at 1/500 scale)
    python bench/bench_steady.py --size real              # a GPU: BLIP-2 OPT-2.7B dimensions (bench/gpu.sh)

Each batch size trains in a process of its own through `vlmtune train` (the vision side cached, as it is when
only LoRA trains): the image-feature pass is timed apart (`cache s`), then the optimizer steps are timed from
the end of the warm-up steps (compilation, cuBLAS and allocator warm-up) to the last, so `samples/s` is the
steady rate. A batch size that runs out of memory is reported as such and the sweep goes on. MFU counts the
language model's executed FLOPs (`bench_flops.py`: forward, activation-only backward, logits over the caption
positions) against the card's dense bf16 peak; on the CPU the table gives TFLOP/s instead. Last, one more run
at the largest batch that fitted is profiled (torch.profiler over a few steady steps) and its top operators by
self time are printed. `--variants` compares `vlmtune train` settings side by side in the same run (each batch
size under each, ratios against the first), e.g. `--variants "" "lm_dropout=0" "lm_dropout=0,lora_dropout=0"`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def one(args: argparse.Namespace) -> dict:
    """One batch size's run (in its own process): step times from an optimizer hook, cache time from the run."""
    import bench
    import bench_flops

    import vlmtune.training.run as finetune
    from vlmtune.config import TrainConfig
    from vlmtune.rundir import read_jsonl

    device = "cuda" if torch.cuda.is_available() else "cpu"
    total = args.warmup + args.steps
    stamps: list[float] = []
    profiler = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        profiler = profile(
            activities=activities, schedule=schedule(wait=args.warmup, warmup=1, active=args.steps, repeat=1)
        )
        profiler.start()

    def after_step(*_: object) -> None:
        _sync()
        stamps.append(time.perf_counter())
        if profiler is not None:
            profiler.step()

    hook = register_optimizer_step_post_hook(after_step)
    out = tempfile.mkdtemp()
    cfg = TrainConfig(
        model=args.model_dir,
        data=args.data_dir,
        output=out,
        max_steps=total + (1 if args.profile else 0),
        batch_size=args.batch,
        lora_r=16,
        lora_alpha=32,
        lr=5e-5,
        overwrite=True,
        sample_every=0,
        num_samples=0,
        log_every=max(total, 1),
        report_to=["none"],
        **json.loads(args.overrides),
    )
    try:
        finetune.train(cfg)
    except torch.OutOfMemoryError:
        return {"batch": args.batch, "oom": True}
    finally:
        hook.remove()
    done = read_jsonl(Path(out) / "metrics.jsonl")[-1]
    r: dict = {"batch": args.batch, "cache_s": done["cache_s"], "steps": len(stamps)}
    # from the stamp at the end of the last warm-up step to the last timed step's: `steps` steps
    steady = stamps[args.warmup - 1 :][: args.steps + 1]
    seconds = steady[-1] - steady[0]
    r["samples_per_s"] = args.batch * (len(steady) - 1) / seconds
    r["step_ms"] = 1000 * seconds / (len(steady) - 1)
    r["peak_gib"] = (
        torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else bench.peak_memory(device)
    )
    tok = __import__("transformers").AutoProcessor.from_pretrained(args.model_dir).tokenizer
    texts = __import__("datasets").load_from_disk(args.data_dir)["train"]["text"]
    text_tokens = sum(len(tok(t)["input_ids"]) + 1 for t in texts) / len(texts)
    lm = bench_flops.per_sample(args.model_dir, text_tokens, 1, cached=True)["lm"]
    r["tflop_s"] = lm * r["samples_per_s"] / 1e12
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((p for k, p in bench_flops.PEAK.items() if k in name), None)
        if peak:
            r["mfu"] = lm * r["samples_per_s"] / peak
    if profiler is not None:
        profiler.stop()
        key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        r["profile"] = profiler.key_averages().table(sort_by=key, row_limit=args.profile_rows)
    return r


def measure(args: argparse.Namespace, batch: int, variant: str = "", profile: bool = False) -> dict:
    cmd = [
        sys.executable, __file__, "--one", "--model-dir", args.model_dir, "--batch", str(batch),
        "--warmup", str(args.warmup), "--steps", str(args.profile_steps if profile else args.steps),
        "--profile-rows", str(args.profile_rows), "--data-dir", args.data_dir, "--overrides",
        json.dumps(overrides(variant)),
        *(["--profile"] if profile else []),
    ]  # fmt: skip
    print(
        f"[steady] {variant or 'default'}, batch {batch}{' (profiled)' if profile else ''} ...",
        file=sys.stderr,
        flush=True,
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    if proc.returncode != 0:
        if "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr:
            return {"variant": variant, "batch": batch, "oom": True}
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"batch {batch} failed")
    return {"variant": variant, **json.loads(proc.stdout.strip().splitlines()[-1])}


def overrides(variant: str) -> dict:
    """`vlmtune train` settings of a variant: "lm_dropout=0,lora_dropout=0" -> {"lm_dropout": 0.0, ...}."""
    out = {}
    for item in filter(None, variant.split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = json.loads(value)
    return out


def table(rows: list[dict], args: argparse.Namespace) -> str:
    import bench

    lines = [
        f"machine: {bench.machine()}; model: {args.size}; captions: {args.captions}; {args.warmup} warm-up "
        f"steps, then {args.steps} timed",
        "",
        f"| {'settings':28} | batch | samples/s | step ms | cache s | peak GiB | TFLOP/s |    MFU |",
        f"|{'-' * 30}|-------|-----------|---------|---------|----------|---------|--------|",
    ]
    first: dict[int, float] = {}  # samples/s of the first settings, per batch size
    ratios = []
    for r in rows:
        name = r["variant"] or "default"
        if r.get("oom"):
            lines.append(f"| {name:28} | {r['batch']:>5} | out of memory | | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else ""
        lines.append(
            f"| {name:28} | {r['batch']:>5} | {r['samples_per_s']:>9.2f} | {r['step_ms']:>7.1f} "
            f"| {r['cache_s']:>7.2f} | {r['peak_gib']:>8.2f} | {r['tflop_s']:>7.3f} | {mfu:>6} |"
        )
        if r["variant"] == rows[0]["variant"]:
            first[r["batch"]] = r["samples_per_s"]
        elif r["batch"] in first:
            ratios.append(
                f"{name}, batch {r['batch']}: {r['samples_per_s'] / first[r['batch']]:.2f}x the first settings"
            )
    return "\n".join(lines + ([""] + ratios if ratios else []))


def main() -> None:
    import bench

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=bench.SIZES, default="proxy")
    ap.add_argument(
        "--captions", choices=["football", "mixed"], default="football", help="mixed: captions of 10-55 words"
    )
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--warmup", type=int, default=10, help="optimizer steps before the timing starts")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps timed")
    ap.add_argument("--profile-steps", type=int, default=5, help="steady steps profiled (0: no profile)")
    ap.add_argument("--profile-rows", type=int, default=12)
    ap.add_argument(
        "--variants",
        nargs="+",
        default=[""],
        help='`vlmtune train` settings to compare, each "key=value,key=value" ("" for the defaults); every '
        "batch size runs under each, and ratios are against the first",
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be at least 1 (the timing starts at the end of a warm-up step)")
    if args.one:
        print(json.dumps(one(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        # images enough for the largest batch; epochs repeat them
        args.model_dir, args.data_dir = bench.workspace(
            tmp, args.size, max(16, *args.batch_sizes), args.captions
        )
        rows = [measure(args, b, v) for v in args.variants for b in args.batch_sizes]
        fitted = [r["batch"] for r in rows if not r.get("oom") and r["variant"] == args.variants[0]]
        profiled = None
        if fitted and args.profile_steps:
            profiled = measure(args, max(fitted), args.variants[0], profile=True)
    print(table(rows, args))
    if profiled is not None:
        print(
            f"\nwhere a step goes (batch {profiled['batch']}, {args.profile_steps} steady steps, self time):"
        )
        print(profiled["profile"])
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": bench.machine(), "args": vars(args), "rows": rows, "profile": profiled},
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
