"""One prepared check of the CUDA paths at BLIP-2 OPT-2.7B's real size, for a machine with a GPU.

    python scripts/gpu_check.py --out results.json

Hub weights cannot be downloaded in this project's machines, so the model is Salesforce/blip2-opt-2.7b's
architecture with random weights (ViT-g 39 layers, Q-Former, OPT-2.7B 32 layers; 3.74B parameters), saved to
disk and loaded back through `vlmtune train --model DIR`, paired with the tiny base's tokenizer and a 224-pixel
image processor. Random weights say nothing about caption quality; they do exercise every CUDA path at full
size: bf16 loading, autocast, fp32 LoRA weights, QLoRA (4-bit NF4 via bitsandbytes), peak memory, throughput,
batched generation, and loading the run back.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch


def build_random_blip2(path: Path) -> None:
    # One definition of the real shape, shared with the benchmark (bench/bench.py).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench import build_model

    build_model("real", path)


def in_memory_splits(n_train: int = 64, n_val: int = 16):
    """The drawn football scenes as lists of rows (this machine may lack `datasets`; the loop needs only rows)."""
    from vlmtune.data.synthetic import examples

    rows = lambda n, seed: [{"image": e.image, "text": e.text} for e in examples("football", n, seed)]  # noqa: E731
    return rows(n_train, 0), rows(n_val, 1)


def train_once(model_dir: Path, out: Path, quantize: str, steps: int, batch_size: int) -> dict:
    import vlmtune.training.pipeline as pipeline
    import vlmtune.training.run as finetune
    from vlmtune.config import TrainConfig
    from vlmtune.rundir import read_jsonl

    train_rows, val_rows = in_memory_splits()
    pipeline.load_splits = lambda *a, **k: (train_rows, val_rows)
    cfg = TrainConfig(
        model=str(model_dir),
        data="(in memory)",
        output=str(out),
        quantize=quantize,
        gradient_checkpointing=quantize != "none",
        max_steps=steps,
        batch_size=batch_size,
        lr=1e-4,
        log_every=5,
        sample_every=0,
        num_samples=2,
        overwrite=True,
    )
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    finetune.train(cfg)
    wall = time.perf_counter() - start
    log = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    return {
        "quantize": quantize,
        "steps": steps,
        "batch_size": batch_size,
        "samples_per_s_in_loop": round(log[-1]["samples_per_s"], 1),
        "first_loss": round(log[0]["loss"], 3),
        "last_loss": round(log[-1]["loss"], 3),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "wall_s_including_load": round(wall, 1),
        "adapter_mib": round((out / "adapter_model.safetensors").stat().st_size / 2**20, 1),
    }


def caption_speed(run: Path, n: int = 64, batch_size: int = 16) -> dict:
    from vlmtune.data.synthetic import examples
    from vlmtune.infer import Captioner

    captioner = Captioner.from_run(str(run))
    images = [e.image for e in examples("football", n, 5)]
    captioner.caption(images[:batch_size], batch_size=batch_size, max_new_tokens=20)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = captioner.caption(images, batch_size=batch_size, max_new_tokens=20)
    torch.cuda.synchronize()
    return {
        "images": n,
        "batch_size": batch_size,
        "images_per_s": round(n / (time.perf_counter() - start), 1),
        "captions_nonempty": sum(bool(c) for c in out),
    }


def survive_checks(work: Path) -> dict:
    """The CUDA side of runs that survive, on the tiny base: bf16 resume, and fp16 with a poisoned batch."""
    from safetensors.torch import load_file

    import vlmtune.training.cache as cache
    import vlmtune.training.loop as loop
    import vlmtune.training.pipeline as pipeline
    import vlmtune.training.run as finetune
    from vlmtune.config import TrainConfig
    from vlmtune.rundir import read_jsonl

    train_rows, val_rows = in_memory_splits(96, 8)
    pipeline.load_splits = lambda *a, **k: (train_rows, None)

    def cfg(out, **kw):
        base = dict(
            model="tiny",
            data="(in memory)",
            output=str(work / out),
            batch_size=8,
            lr=3e-3,
            sample_every=0,
            num_samples=0,
            save_every=10,
            overwrite=True,
        )
        return TrainConfig(**(base | kw))

    out: dict = {}
    straight = finetune.train(cfg("straight", max_steps=30))
    real_save = loop.Session.save

    def crash_after_20(self, run, optimizer, scheduler, state):
        path = real_save(self, run, optimizer, scheduler, state)
        if state.step == 20:
            raise RuntimeError("simulated crash after the step-20 checkpoint")
        return path

    loop.Session.save = crash_after_20
    try:
        finetune.train(cfg("resumed", max_steps=30))
    except RuntimeError as e:
        out["crash"] = str(e)
    loop.Session.save = real_save
    finetune.train(cfg("resumed", max_steps=30, resume="auto", overwrite=False))
    a = load_file(str(straight / "adapter_model.safetensors"))
    b = load_file(str(work / "resumed" / "adapter_model.safetensors"))
    out["bf16_resume_max_abs_diff"] = max((a[k] - b[k]).abs().max().item() for k in a)
    out["bf16_resume_bitwise"] = all(torch.equal(a[k], b[k]) for k in a)
    rng = torch.load(work / "resumed" / "checkpoints" / "step-00000030" / "rng.pt", weights_only=False)
    out["cuda_rng_saved"] = "cuda" in rng

    real = cache.build_feature_cache

    def poisoned(*args, **kwargs):
        features = real(*args, **kwargs)
        features[3] = float("nan")
        return features

    cache.build_feature_cache = poisoned
    run = finetune.train(cfg("fp16-nan", dtype="float16", epochs=3))
    cache.build_feature_cache = real
    records = read_jsonl(run / "metrics.jsonl")
    out["fp16_skipped_steps"] = records[-1]["skipped_steps"]
    out["fp16_adapter_finite"] = all(
        torch.isfinite(v).all().item() for v in load_file(str(run / "adapter_model.safetensors")).values()
    )
    out["fp16_last_loss"] = [r["loss"] for r in records if "loss" in r][-1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/vlmtune-gpu"))
    ap.add_argument(
        "--only", choices=["survive"], help="just the checkpoint / resume / fp16 checks (tiny model)"
    )
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def save():
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2), flush=True)

    if args.only == "survive":
        result["survive"] = survive_checks(args.work)
        save()
        return
    model_dir = args.work / "blip2-opt-2.7b-random"
    t = time.perf_counter()
    build_random_blip2(model_dir)
    result["build_and_save_s"] = round(time.perf_counter() - t, 1)
    result["bf16_lora"] = train_once(model_dir, args.work / "run-bf16", "none", steps=30, batch_size=8)
    save()
    result["caption_bf16"] = caption_speed(args.work / "run-bf16")
    save()
    try:
        import bitsandbytes  # noqa: F401

        result["qlora_4bit"] = train_once(model_dir, args.work / "run-4bit", "4bit", steps=20, batch_size=8)
    except ImportError as e:
        result["qlora_4bit"] = f"skipped: {e}"
    save()


if __name__ == "__main__":
    main()
