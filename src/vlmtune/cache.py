"""Image features computed once: with the vision side frozen, every epoch would recompute the same thing.

For BLIP-2 OPT-2.7B the frozen ViT-g forward is about half of each training sample's FLOPs (0.52 of ~1.1 TFLOP),
so over the seed recipe's 11 epochs caching it removes ten of eleven of those passes. The cache holds what the
language model receives in place of the image placeholders: (N, num_query_tokens, d_lm) in the model's dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .families import Family

# Keep the cache on the accelerator when it is this small; beyond, in host memory, fetched per batch; beyond
# HOST_LIMIT, in a memory-mapped file, so a million-image dataset does not need 100+ GB of RAM.
ON_DEVICE_LIMIT = 2 * 2**30
HOST_LIMIT = 8 * 2**30
# numpy has no bfloat16: rows are stored as raw 16-bit words and viewed back as the torch dtype.
_AS_STORED = {torch.bfloat16: torch.int16, torch.float16: torch.float16, torch.float32: torch.float32}


class DiskFeatures:
    """Cached features in a memory-mapped .npy file: `store[index]` reads just the rows of one batch."""

    device = torch.device("cpu")

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: torch.dtype):
        self.dtype = dtype
        stored = torch.empty(0, dtype=_AS_STORED[dtype]).numpy().dtype
        self.array = np.lib.format.open_memmap(path, mode="w+", dtype=stored, shape=shape)

    def write(self, start: int, rows: torch.Tensor) -> None:
        self.array[start : start + len(rows)] = rows.cpu().contiguous().view(_AS_STORED[self.dtype]).numpy()

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[index.cpu().numpy()])).view(self.dtype)

    def __len__(self) -> int:
        return len(self.array)


def wants_cache(cfg: Any, family: Family, model: Any) -> tuple[bool, str]:
    """(use the cache?, why) for a training config: only when nothing before the language model trains."""
    if cfg.vision_cache == "off":
        return False, "--vision-cache off"
    if getattr(cfg, "streaming", False):
        return False, "--streaming: each image is decoded when the stream reaches it"
    if cfg.train_qformer or cfg.train_projection:
        return False, "the Q-Former or projection trains, so image features change every step"
    if not family.supports_feature_cache(model):
        return False, "this transformers version cannot take precomputed image features (needs >= 5.24)"
    return True, "vision side frozen: image features computed once and reused every epoch"


@torch.no_grad()
def build_feature_cache(
    model: Any,
    family: Family,
    collate: Any,
    examples: Any,
    *,
    dtype: torch.dtype,
    accelerator: Any,
    batch_size: int,
    num_workers: int = 0,
    spill_dir: Path | None = None,
) -> torch.Tensor | DiskFeatures:
    """Features for every example, in order: (N, num_query_tokens, d_lm).

    Runs the frozen modules in eval mode (no dropout), as training does, so cached and fresh features agree.
    """
    loader = DataLoader(examples, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    was_training = model.training
    model.eval()
    parts: list[torch.Tensor] = []
    disk: DiskFeatures | None = None
    done = 0
    bar = tqdm(
        loader, desc="caching image features", unit="batch", disable=not accelerator.is_local_main_process
    )
    for batch in bar:
        pixels = batch["pixel_values"].to(accelerator.device, dtype)
        with accelerator.autocast():
            rows = family.image_features(model, pixels).to(dtype)
        total = rows[0].numel() * rows.element_size() * len(examples)
        if done == 0 and spill_dir is not None and total > HOST_LIMIT:
            # One file per process: under `accelerate launch` every process holds the whole cache.
            path = spill_dir / f"feature_cache.{accelerator.process_index}.npy"
            disk = DiskFeatures(path, (len(examples), *rows.shape[1:]), dtype)
        if disk is not None:
            disk.write(done, rows)
        else:
            parts.append(rows)
        done += len(rows)
    model.train(was_training)
    if disk is not None:
        return disk
    features = torch.cat(parts)
    if features.numel() * features.element_size() > ON_DEVICE_LIMIT:
        return features.cpu().pin_memory() if features.is_cuda else features.cpu()
    return features
