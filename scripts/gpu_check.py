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


# Qwen/Qwen2.5-VL-3B-Instruct's config.json (the shape only; 3.75B parameters)
QWEN25_VL_3B = dict(
    vision_config=dict(
        depth=32, hidden_size=1280, out_hidden_size=2048, intermediate_size=3420, num_heads=16, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
        hidden_act="silu", tokens_per_second=2,
    ),
    text_config=dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    ),
)  # fmt: skip


def build_random_qwen(path: Path, shape: dict = QWEN25_VL_3B) -> None:
    """Qwen2.5-VL at `shape` with random weights, saved as a checkpoint directory, with the tests' Qwen-kind
    tokenizer (real special tokens and chat template; a small vocabulary inside the real one) and a 14-pixel
    image processor at the real limits (up to 1280 tokens an image; the run caps them with --max-pixels)."""
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_families import QWEN2_VL_TEMPLATE, corpus
    from vlmtune.tiny import qwen_tokenizer

    tok = qwen_tokenizer(corpus())
    ids = lambda t: tok.convert_tokens_to_ids(t)  # noqa: E731
    text = dict(
        shape["text_config"], eos_token_id=ids("<|im_end|>"), pad_token_id=tok.pad_token_id, bos_token_id=None
    )
    config = transformers.Qwen2_5_VLConfig(
        vision_config=shape["vision_config"],
        text_config=text,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(path)
    images = transformers.Qwen2VLImageProcessor(
        size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
    )
    videos = transformers.Qwen2VLVideoProcessor()
    transformers.Qwen2_5_VLProcessor(
        image_processor=images, tokenizer=tok, video_processor=videos, chat_template=QWEN2_VL_TEMPLATE
    ).save_pretrained(path)


# google/gemma-3-4b-it's config.json (the shape only; 4.3B parameters)
GEMMA3_4B = dict(
    vision_config=dict(
        model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
        num_attention_heads=16, image_size=896, patch_size=14, vision_use_head=False,
    ),
    text_config=dict(
        vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(34)],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
    ),
    mm_tokens_per_image=256,
)  # fmt: skip


def build_random_gemma(path: Path, shape: dict = GEMMA3_4B) -> None:
    """Gemma 3 at `shape` with random weights, saved as a checkpoint directory, with the tests' Gemma-kind
    tokenizer (real special tokens and chat template) and an 896-pixel image processor."""
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_families import GEMMA3_TEMPLATE, corpus
    from vlmtune.tiny import gemma_tokenizer

    tok = gemma_tokenizer(corpus())
    ids = tok.convert_tokens_to_ids
    config = transformers.Gemma3Config(
        vision_config=shape["vision_config"],
        text_config=dict(
            shape["text_config"], pad_token_id=0, eos_token_id=[1, ids("<end_of_turn>")], bos_token_id=2
        ),
        mm_tokens_per_image=shape["mm_tokens_per_image"],
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.Gemma3ForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(path)
    size = shape["vision_config"]["image_size"]
    images = transformers.Gemma3ImageProcessor(size={"height": size, "width": size})
    transformers.Gemma3Processor(
        image_processor=images,
        tokenizer=tok,
        chat_template=GEMMA3_TEMPLATE,
        image_seq_length=shape["mm_tokens_per_image"],
    ).save_pretrained(path)


def in_memory_splits(n_train: int = 64, n_val: int = 16):
    """The drawn football scenes as lists of rows (this machine may lack `datasets`; the loop needs only rows)."""
    from vlmtune.data.synthetic import examples

    rows = lambda n, seed: [{"image": e.image, "text": e.text} for e in examples("football", n, seed)]  # noqa: E731
    return rows(n_train, 0), rows(n_val, 1)


def train_once(model_dir: Path, out: Path, quantize: str, steps: int, batch_size: int, **extra) -> dict:
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
        **extra,
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
        "--only",
        choices=["survive", "qwen", "gemma"],
        help="survive: the checkpoint / resume / fp16 checks (tiny model); qwen / gemma: Qwen2.5-VL-3B's or "
        "Gemma-3-4B's shape",
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
    if args.only == "qwen":
        model_dir = args.work / "qwen2.5-vl-3b-random"
        build_random_qwen(model_dir)
        # 224 x 224 football scenes at up to 512 x 512 pixels: 64 image tokens each, ~100 tokens an example
        qwen = dict(max_pixels=512 * 512, max_length=128, prompt="Describe this image.")
        result["qwen_bf16_lora"] = train_once(model_dir, args.work / "run-qwen", "none", 30, 4, **qwen)
        save()
        result["qwen_caption_bf16"] = caption_speed(args.work / "run-qwen")
        save()
        return
    if args.only == "gemma":
        model_dir = args.work / "gemma-3-4b-random"
        build_random_gemma(model_dir)
        gemma = dict(max_length=96, prompt="Describe this image.")
        result["gemma_bf16_lora"] = train_once(model_dir, args.work / "run-gemma", "none", 30, 4, **gemma)
        save()
        result["gemma_caption_bf16"] = caption_speed(args.work / "run-gemma")
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
