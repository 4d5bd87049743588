"""The seed recipe corrected by hand: what a careful user writes in plain transformers + peft once they know
the seed's bugs, the fair baseline for vlmtune's training speed.

Fixed, against `seed_recipe.py`: each caption is processed together with its image, so the processor puts
the 32 image placeholders in front and the language model sees the image (the seed's caption tokens carry
none); the caption ends with BLIP-2 OPT's end token ("\\n", its config's `eos_token_id`), so captions learn
to stop; the labels are -100 on padding, on the image placeholders and on `<s>`, so only the caption and its
end train; the attention mask is passed; no `generate` in the loop (the seed's every-10-steps sample is
monitoring, not training). Kept: batch 2, AdamW at 5e-5, peft's default LoRA targets (q_proj / v_proj),
11 epochs; fp32 on the CPU, bf16 on a GPU (no 8-bit: a careful user with the memory trains in bf16).
"""

from __future__ import annotations

import time

import torch
from seed_recipe import memory_now
from torch.utils.data import DataLoader


def collate(processor, config, batch: list[dict]) -> dict[str, torch.Tensor]:
    """Images and captions processed together (the placeholders), each caption ended, only it trained."""
    end = processor.tokenizer.decode([config.text_config.eos_token_id])  # "\n" for BLIP-2 OPT
    enc = processor(
        images=[row["image"] for row in batch],
        text=[row["text"] + end for row in batch],
        padding=True,
        return_tensors="pt",
    )
    labels = enc["input_ids"].clone()
    skip = (enc["attention_mask"] == 0) | (labels == config.image_token_id)
    labels[skip | (labels == processor.tokenizer.bos_token_id)] = -100
    enc["labels"] = labels
    return enc


def train(
    model_dir: str, rows: list[dict], out: str, device: str, epochs: int = 11, batch_size: int = 2
) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none"))
    loader = DataLoader(
        rows, shuffle=True, batch_size=batch_size, collate_fn=lambda b: collate(processor, model.config, b)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    model.train()
    samples, start, memory_before = 0, time.perf_counter(), memory_now(device)
    for _ in range(epochs):
        for batch in loader:
            batch = {
                k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()
            }
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            samples += batch["input_ids"].shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.save_pretrained(out)
    return {"samples": samples, "seconds": seconds, "memory_before": memory_before}
