"""vlmtune against the seed recipe, side by side in one run: training and captioning samples/s, peak memory.

    python bench/bench.py                       # CPU proxy, a few minutes on 2 cores (make bench)
    python bench/bench.py --size real           # BLIP-2 OPT-2.7B dimensions, on a GPU (bench/gpu.sh)

Both sides get the same model (random weights from a Blip2Config: no download), the same drawn football images
and captions (a `datasets` copy on disk, read as the seed reads its hub dataset), the same epochs and LoRA rank, and on the CPU the same batch size. Each measurement runs in a
subprocess of its own, so peak memory (RSS on the CPU, allocated CUDA memory on a GPU) is its own; `work GiB`
is the peak above what was held when the timed part began. Times exclude loading and saving the model;
vlmtune's include its one-off image-feature cache. The table ends with one
`name: ratio x` line per comparison (vlmtune's samples/s over the baseline's, and its work memory over the
baseline's). Two baselines: the seed recipe as written (`seed_recipe.py`: its model never sees the image) and
corrected by hand (`seed_corrected.py`: what a careful user writes in plain transformers + peft).

The CPU proxy keeps BLIP-2's shape at a size 2 cores can train: 224-pixel images in 14-pixel patches
(257 image tokens), 32 query tokens, and about 2.5 language-model parameters per vision-encoder parameter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# The seed's adapter: peft's default LoRA targets for BLIP-2, two of the six linears of each OPT layer.
# vlmtune wraps all six by default (a bigger adapter, more work per step); this variant does the seed's work.
SEED_LORA_TARGETS = r".*language_model.*\.(q_proj|v_proj)"

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

SIZES = {
    # ViT 4 x 192 (1.9M) : Q-Former : OPT 6 x 256 (4.9M)
    "proxy": dict(
        vision_config=dict(
            hidden_size=192,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=3,
            image_size=224,
            patch_size=14,
            initializer_range=0.02,
        ),
        qformer_config=dict(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            cross_attention_frequency=2,
            encoder_hidden_size=192,
            vocab_size=8,
        ),
        text_config=dict(
            model_type="opt",
            hidden_size=256,
            ffn_dim=1024,
            num_hidden_layers=6,
            num_attention_heads=4,
            word_embed_proj_dim=256,
        ),
    ),
    # Salesforce/blip2-opt-2.7b: ViT-g 39 x 1408 (1.0B), Q-Former 12 x 768, OPT-2.7B 32 x 2560
    "real": dict(
        vision_config=dict(
            hidden_size=1408,
            intermediate_size=6144,
            num_hidden_layers=39,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            qkv_bias=True,
        ),
        qformer_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            cross_attention_frequency=2,
            encoder_hidden_size=1408,
            vocab_size=30522,
        ),
        text_config=dict(
            model_type="opt",
            hidden_size=2560,
            ffn_dim=10240,
            num_hidden_layers=32,
            num_attention_heads=32,
            word_embed_proj_dim=2560,
        ),
    ),
}


def build_model(size: str, path: Path, vocab_size: int | None = None) -> None:
    """Random weights in the chosen shape, with the tiny base's byte-level tokenizer (ids fit any vocabulary)."""
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        Blip2Config,
        Blip2Processor,
        BlipImageProcessorPil,
    )

    from vlmtune.modeling import TINY_PATH

    tok = AutoProcessor.from_pretrained(TINY_PATH).tokenizer
    shape = SIZES[size]
    text = dict(
        shape["text_config"],
        vocab_size=vocab_size or (len(tok) if size == "proxy" else 50304),
        bos_token_id=2,
        pad_token_id=1,
        eos_token_id=tok.convert_tokens_to_ids("Ċ"),
    )
    config = Blip2Config(
        vision_config=shape["vision_config"],
        qformer_config=shape["qformer_config"],
        text_config=text,
        num_query_tokens=32,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(
            config, dtype=torch.bfloat16 if size == "real" else None
        )
    model.save_pretrained(path)
    Blip2Processor(
        BlipImageProcessorPil(size={"height": 224, "width": 224}), tok, num_query_tokens=32
    ).save_pretrained(path)


MORE = ("near the goal", "on a sunny afternoon", "in front of a large crowd", "while the referee watches",
        "with a white line across the grass", "during the second half of the match")  # fmt: skip


def workspace(tmp: str, size: str, images: int, captions: str = "football") -> tuple[str, str]:
    """(model dir, data dir) in `tmp`: the random-weight model of `size` and `images` drawn football images
    with captions as a `datasets` copy on disk, as every benchmark here reads them. `captions="mixed"`
    lengthens them by 0 to 6 clauses at random (a drawn caption is 10-17 words; these 10-55), for what
    padding costs."""
    import datasets

    from vlmtune.data.synthetic import write_football_dataset

    model_dir = Path(tmp) / f"blip2-{size}"
    build_model(size, model_dir)
    data = write_football_dataset(Path(tmp) / "football", {"train": (images, 0)})
    if captions == "mixed":
        rng = random.Random(0)
        split = datasets.load_from_disk(str(data))
        texts = [
            t + "".join(" " + rng.choice(MORE) for _ in range(rng.choice([0, 0, 1, 3, 6])))
            for t in split["train"]["text"]
        ]
        split["train"] = split["train"].remove_columns("text").add_column("text", texts)
        data = Path(tmp) / "football-mixed"
        split.save_to_disk(str(data))
    return str(model_dir), str(data)


def rows(n: int, seed: int) -> list[dict]:
    from vlmtune.data.synthetic import examples

    return [{"image": e.image, "text": e.text} for e in examples("football", n, seed)]


def memory_now(device: str) -> float:
    from seed_recipe import memory_now

    return memory_now(device)


def peak_memory(device: str) -> float:
    """GiB: the most CUDA memory allocated, or this process's peak resident set on the CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def one(args: argparse.Namespace) -> dict:
    """A single measurement, run in its own process."""
    import bench_flops
    import seed_recipe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count() if device == "cuda" else torch.get_num_threads())
    out = tempfile.mkdtemp()
    if args.one in ("seed-train", "seed-corrected-train"):
        import datasets
        import seed_corrected

        # the seed's load_dataset(..., split="train"), from the local copy
        train_rows = datasets.load_from_disk(args.data_dir)["train"]
        recipe = seed_recipe if args.one == "seed-train" else seed_corrected
        r = recipe.train(
            args.model_dir, train_rows, out, device, args.seed_epochs or args.epochs, args.batch_size
        )
    elif args.one.startswith("vlmtune-train"):
        import vlmtune.training.run as finetune
        from vlmtune.config import TrainConfig
        from vlmtune.rundir import read_jsonl

        # The memory in use once the model is loaded and the data read, as the seed's loop starts with it.
        before, batches = {}, finetune.batches

        def measured_batches(*a, **k):
            before["gib"] = memory_now(device)
            return batches(*a, **k)

        finetune.batches = measured_batches
        cfg = TrainConfig(
            model=args.model_dir,
            data=args.data_dir,
            output=out,
            epochs=args.epochs,
            batch_size=args.vlmtune_batch_size or args.batch_size,
            lora_r=16,
            lora_alpha=32,
            lr=5e-5,
            overwrite=True,
            compile=args.one.endswith("compiled"),  # its compile time counts: it is in the loop's time
            lora_targets=SEED_LORA_TARGETS if args.one.endswith("seed-lora") else None,
        )
        finetune.train(cfg)
        done = read_jsonl(Path(out) / "metrics.jsonl")[-1]
        r = {
            "samples": done["train_samples"],
            "seconds": done["cache_s"] + done["loop_s"],
            "cache_s": done["cache_s"],
            "batch_size": cfg.batch_size,
            "memory_before": before["gib"],
        }
        r.update(bench_flops.utilisation(args.model_dir, r, args.epochs, device))
    elif args.one == "seed-caption":
        n = args.seed_caption_images or args.caption_images
        r = seed_recipe.caption(args.model_dir, [x["image"] for x in rows(n, 1)], device)
    else:
        from vlmtune.infer import Captioner

        images = [x["image"] for x in rows(args.caption_images, 1)]
        captioner = Captioner.from_model(args.model_dir)
        captioner.caption(
            images[: args.caption_batch_size], batch_size=args.caption_batch_size, max_new_tokens=2
        )
        if device == "cuda":
            torch.cuda.synchronize()
        start, memory_before = time.perf_counter(), memory_now(device)
        captioner.caption(images, batch_size=args.caption_batch_size, max_new_tokens=20, min_new_tokens=20)
        if device == "cuda":
            torch.cuda.synchronize()
        r = {
            "samples": len(images),
            "seconds": time.perf_counter() - start,
            "batch_size": args.caption_batch_size,
            "memory_before": memory_before,
        }
    r["peak_gib"] = peak_memory(device)
    # What the work itself took above the loaded model, libraries and data (which dominate a tiny proxy).
    r["work_gib"] = r["peak_gib"] - r.pop("memory_before")
    r["samples_per_s"] = r["samples"] / r["seconds"]
    return r


def measure(name: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--one",
        name,
        "--model-dir",
        args.model_dir,
        "--images",
        str(args.images),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--vlmtune-batch-size",
        str(args.vlmtune_batch_size),
        "--caption-images",
        str(args.caption_images),
        "--caption-batch-size",
        str(args.caption_batch_size),
        "--seed-epochs",
        str(args.seed_epochs),
        "--seed-caption-images",
        str(args.seed_caption_images),
        "--data-dir",
        args.data_dir,
    ]
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{name} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def table(results: dict, args: argparse.Namespace) -> str:
    lines = [
        f"machine: {machine()}; model: {args.size}; {args.images} images x {args.epochs} epochs; "
        f"captioning {args.caption_images} images, 20 new tokens each",
        "",
        f"| {'run':23} | {'batch':>5} | {'samples/s':>10} | {'peak GiB':>8} | {'work GiB':>8} | {'MFU':>6} |",
        f"|{'-' * 25}|{'-' * 7}|{'-' * 12}|{'-' * 10}|{'-' * 10}|{'-' * 8}|",
    ]
    for name, r in results.items():
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else ""
        batch = {"seed-caption": 1}.get(name, r.get("batch_size", args.batch_size))
        lines.append(
            f"| {name:23} | {batch:>5} | {r['samples_per_s']:>10.2f} | {r['peak_gib']:>8.2f} "
            f"| {r['work_gib']:>8.3f} | {mfu:>6} |"
        )
    lines.append("")
    for task, ours, base in (
        ("train", "vlmtune-train", "seed-train"),
        ("train, the seed's LoRA targets", "vlmtune-train-seed-lora", "seed-train"),
        ("train vs the corrected seed", "vlmtune-train", "seed-corrected-train"),
        ("train vs the corrected seed, its LoRA targets", "vlmtune-train-seed-lora", "seed-corrected-train"),
        ("train, compiled", "vlmtune-train-compiled", "seed-train"),
        ("caption", "vlmtune-caption", "seed-caption"),
    ):
        if base in results and ours in results:
            speed = results[ours]["samples_per_s"] / results[base]["samples_per_s"]
            memory = results[ours]["work_gib"] / max(results[base]["work_gib"], 1e-9)
            lines.append(f"{task}: {speed:.1f}x ({memory:.2f}x the work memory)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="proxy")
    ap.add_argument("--images", type=int, default=32, help="training images")
    ap.add_argument("--epochs", type=int, default=11, help="the seed trains 11")
    ap.add_argument("--batch-size", type=int, default=2, help="the seed's batch size")
    ap.add_argument("--vlmtune-batch-size", type=int, default=0, help="vlmtune's (0: the seed's)")
    ap.add_argument(
        "--seed-epochs",
        type=int,
        default=0,
        help="epochs for the seed (0: --epochs); its samples/s does not depend on it, so a GPU run "
        "can time one epoch of its slow loop",
    )
    ap.add_argument("--caption-images", type=int, default=64)
    ap.add_argument(
        "--seed-caption-images", type=int, default=0, help="images for the seed's loop (0: the same)"
    )
    ap.add_argument("--caption-batch-size", type=int, default=16)
    ap.add_argument(
        "--only",
        nargs="*",
        default=[
            "seed-train",
            "seed-corrected-train",
            "vlmtune-train",
            "vlmtune-train-seed-lora",
            "seed-caption",
            "vlmtune-caption",
        ],
        help="measurements to make; vlmtune-train-compiled adds training with --compile",
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.model_dir, args.data_dir = workspace(tmp, args.size, args.images)
        results = {name: measure(name, args) for name in args.only}
    text = table(results, args)
    print(text)
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine(), "args": vars(args), "results": results}, indent=2, default=str)
        )


if __name__ == "__main__":
    main()
