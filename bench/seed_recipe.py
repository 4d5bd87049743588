"""The seed recipe (../shared/seed, a LoRA-on-BLIP-2 notebook), ported only as far as transformers 5 needs.

Kept as written: images and captions processed separately (so on transformers >= 4.47 the caption tokens carry
no image placeholders and the model never sees the image), `labels=input_ids` (padding trained on), no end
token, no attention mask, batch 2, AdamW at 5e-5, no schedule, no clipping, peft's default LoRA targets for
BLIP-2 (q_proj / v_proj), a `generate` every 10 steps, 11 epochs, LLM.int8 + fp16 on a GPU.
Changed for transformers 5: `AutoModelForImageTextToText` for `AutoModelForVision2Seq`,
`quantization_config=BitsAndBytesConfig(load_in_8bit=True)` for `load_in_8bit=True`, `dtype=` for
`torch_dtype=`, and `max_new_tokens=20` in `generate` (its default `max_length=20` is now shorter than the
32 image placeholders the processor puts in front).
No network: `load_dataset("ybelkada/football-dataset", split="train")` becomes the benchmark's drawn copy of
that dataset, a `datasets.Dataset` read from disk (plain rows where `datasets` is not installed, `--data
memory`), which `ImageCaptioningDataset` indexes as written.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


def load(model_dir: str, device: str) -> tuple[Any, Any, torch.dtype]:
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    processor = AutoProcessor.from_pretrained(model_dir)
    if device == "cuda":  # the seed: load_in_8bit=True, fp16
        model = AutoModelForImageTextToText.from_pretrained(
            model_dir,
            quantization_config=BitsAndBytesConfig(load_in_8bit=True),
            dtype=torch.float16,
            device_map={"": 0},
        )
        return model, processor, torch.float16
    return AutoModelForImageTextToText.from_pretrained(model_dir).to(device), processor, torch.float32


class ImageCaptioningDataset(Dataset):
    def __init__(self, dataset, processor):
        self.dataset = dataset
        self.processor = processor

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        item = self.dataset[idx]
        encoding = self.processor(images=item["image"], padding="max_length", return_tensors="pt")
        # remove batch dimension
        encoding = {k: v.squeeze() for k, v in encoding.items()}
        encoding["text"] = item["text"]
        return encoding


def train(
    model_dir: str, rows: list[dict], out: str, device: str, epochs: int = 11, batch_size: int = 2
) -> dict:
    """The seed's training loop; returns samples and seconds of the loop (model load and save excluded)."""
    from peft import LoraConfig, get_peft_model

    model, processor, dtype = load(model_dir, device)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none")
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    def collate_fn(batch):
        # pad the input_ids and attention_mask
        processed_batch = {}
        for key in batch[0]:
            if key != "text":
                processed_batch[key] = torch.stack([example[key] for example in batch])
            else:
                text_inputs = processor.tokenizer(
                    [example["text"] for example in batch], padding=True, return_tensors="pt"
                )
                processed_batch["input_ids"] = text_inputs["input_ids"]
                processed_batch["attention_mask"] = text_inputs["attention_mask"]
        return processed_batch

    train_dataloader = DataLoader(
        ImageCaptioningDataset(rows, processor), shuffle=True, batch_size=batch_size, collate_fn=collate_fn
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    model.train()
    samples, start, memory_before = 0, time.perf_counter(), memory_now(device)  # (the benchmark's)
    for epoch in range(epochs):
        print("Epoch:", epoch)
        for idx, batch in enumerate(train_dataloader):
            input_ids = batch.pop("input_ids").to(device)
            pixel_values = batch.pop("pixel_values").to(device, dtype)

            outputs = model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids)
            loss = outputs.loss
            print("Loss:", loss.item())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            samples += input_ids.shape[0]

            if idx % 10 == 0:
                generated_output = model.generate(pixel_values=pixel_values, max_new_tokens=20)
                print(processor.batch_decode(generated_output, skip_special_tokens=True))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.save_pretrained(out)
    return {"samples": samples, "seconds": seconds, "memory_before": memory_before}


def memory_now(device: str) -> float:
    """GiB: CUDA memory allocated now, or this process's resident set now."""
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**30
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def caption(model_dir: str, images: list, device: str, new_tokens: int = 20) -> dict:
    """The seed's inference: one image at a time through `generate`."""
    model, processor, dtype = load(model_dir, device)
    model.eval()
    start, memory_before = time.perf_counter(), memory_now(device)
    for image in images:
        inputs = processor(images=image, return_tensors="pt").to(device, dtype)
        generated_ids = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        processor.batch_decode(generated_ids, skip_special_tokens=True)[0].strip()
    if device == "cuda":
        torch.cuda.synchronize()
    return {"samples": len(images), "seconds": time.perf_counter() - start, "memory_before": memory_before}
