"""Image features computed once: with the vision side frozen, every epoch would recompute the same thing.

For BLIP-2 OPT-2.7B the frozen ViT-g forward is about half of each training sample's FLOPs (0.52 of ~1.1 TFLOP),
so over the seed recipe's 11 epochs caching it removes ten of eleven of those passes. The cache holds what the
language model receives in place of the image placeholders: (N, num_query_tokens, d_lm) in the model's dtype;
when the Q-Former or projection trains, the vision encoder's output alone, and those modules run on it each step.
Several processes fill it together; `--feature-cache-dir` keeps it for later runs on the same model and data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .families import Family

# Keep the cache on the accelerator when it is this small; beyond, in host memory, fetched per batch; beyond
# HOST_LIMIT, in a memory-mapped file, so a million-image dataset does not need 100+ GB of RAM.
ON_DEVICE_LIMIT = 2 * 2**30
HOST_LIMIT = 8 * 2**30
# Processes exchange their shares of the cache in pieces of at most this much each.
EXCHANGE_BYTES = 256 * 2**20
# numpy has no bfloat16: rows are stored as raw 16-bit words and viewed back as the torch dtype.
_AS_STORED = {torch.bfloat16: torch.int16, torch.float16: torch.float16, torch.float32: torch.float32}


class DiskFeatures:
    """Cached features in a memory-mapped .npy file: `store[index]` reads just the rows of one batch."""

    device = torch.device("cpu")

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: torch.dtype):
        self.path, self.dtype = path, dtype
        stored = torch.empty(0, dtype=_AS_STORED[dtype]).numpy().dtype
        self.array = np.lib.format.open_memmap(path, mode="w+", dtype=stored, shape=shape)

    @classmethod
    def open(cls, path: Path, dtype: torch.dtype) -> DiskFeatures:
        """An existing file, read-only."""
        store = cls.__new__(cls)
        store.path, store.dtype, store.array = path, dtype, np.load(path, mmap_mode="r")
        return store

    def write(self, start: int, rows: torch.Tensor) -> None:
        self.array[start : start + len(rows)] = rows.cpu().contiguous().view(_AS_STORED[self.dtype]).numpy()

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[index.cpu().numpy()])).view(self.dtype)

    def __len__(self) -> int:
        return len(self.array)


def wants_cache(cfg: Any, family: Family, model: Any) -> tuple[str | None, str]:
    """(what to cache, why) for a training config: the image path up to the language projection when none
    of it trains, the vision encoder's output alone when the Q-Former or projection does, or None."""
    if cfg.vision_cache == "off":
        return None, "--vision-cache off"
    if getattr(cfg, "streaming", False):
        return None, "--streaming: each image is decoded when the stream reaches it"
    if not family.supports_feature_cache(model):
        return None, "this transformers version cannot take precomputed image features (needs >= 5.24)"
    if cfg.train_qformer or cfg.train_projection:
        return (
            "vision",
            "the Q-Former or projection trains: the frozen vision encoder's output is computed once",
        )
    return "projection", "vision side frozen: image features computed once and reused every epoch"


def kept_features(
    model: Any,
    family: Family,
    collate: Any,
    examples: Any,
    *,
    dtype: torch.dtype,
    accelerator: Any,
    keep_dir: Path | None,
    upto: str = "projection",
    **build: Any,
) -> tuple[torch.Tensor | DiskFeatures, str]:
    """`build_feature_cache`, read from `keep_dir` when an earlier run on the same model and data left the
    features there (and leaves them there for the next one otherwise). Returns (features, what happened, or
    "" without a `keep_dir`)."""
    key = store_key(model, family, collate, examples, dtype, accelerator, upto) if keep_dir else None
    build |= dict(dtype=dtype, accelerator=accelerator, upto=upto)
    if key is None:
        why = "" if keep_dir is None else "not kept: the data has no `datasets` fingerprint to name them by"
        return build_feature_cache(model, family, collate, examples, **build), why
    path = Path(keep_dir) / f"{key}.npy"
    found = _readable(path, len(examples))
    if accelerator.num_processes > 1:  # all read, or all compute together: the pass exchanges shares
        flag = torch.tensor([int(found)], device=accelerator.device)
        found = bool(accelerator.reduce(flag, "sum").item() == accelerator.num_processes)
    if found:
        return _load(path, dtype, accelerator.device), f"read from {path}"
    features = build_feature_cache(model, family, collate, examples, **build)
    if accelerator.is_main_process:
        _save(features, path, dtype)
    return features, f"kept in {path}"


@torch.no_grad()
def store_key(
    model: Any,
    family: Family,
    collate: Any,
    examples: Any,
    dtype: torch.dtype,
    accelerator: Any,
    upto: str = "projection",
) -> str | None:
    """A file name for the features of `examples` that changes with anything that changes them: the data
    (its `datasets` fingerprint, which follows the files and every selection made from them) and the model,
    processor and dtype (the features they give a fixed drawn probe image, bit for bit). None for data
    without a fingerprint. Every process gets the main process's key."""
    fingerprint = getattr(getattr(examples, "dataset", None), "_fingerprint", None)
    if fingerprint is None:
        return None
    probe = Image.fromarray((np.indices((96, 128, 3)).sum(axis=0) * 37 % 256).astype(np.uint8))
    batch = collate([{"image": probe, "prompt": "", "target": "a probe"}])
    was_training = model.training
    model.eval()
    with accelerator.autocast():
        pixels = batch["pixel_values"].to(accelerator.device, dtype)
        rows = family.image_features(model, pixels, upto).to(dtype)
    model.train(was_training)
    digest = hashlib.sha256(rows.float().cpu().numpy().tobytes())
    digest.update(json.dumps([fingerprint, len(examples), examples.image_column, str(dtype), upto]).encode())
    key = [digest.hexdigest()[:32]]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(key)
    return key[0]


def _readable(path: Path, n: int) -> bool:
    try:
        return np.load(path, mmap_mode="r").shape[0] == n
    except (OSError, ValueError):
        return False


def _load(path: Path, dtype: torch.dtype, device: torch.device) -> torch.Tensor | DiskFeatures:
    """Kept features where `build_feature_cache` would have put them: device, host memory or the file."""
    stored = DiskFeatures.open(path, dtype)
    tier = _tier(stored.array.nbytes)
    if tier == "disk":
        return stored
    features = torch.from_numpy(np.array(stored.array)).view(dtype)
    if tier == "host":
        return features.pin_memory() if device.type == "cuda" else features
    return features.to(device)


def _tier(nbytes: int) -> str:
    """Where a cache of this size lives: "device" (the accelerator), "host" memory, or "disk"."""
    return "disk" if nbytes > HOST_LIMIT else "host" if nbytes > ON_DEVICE_LIMIT else "device"


def _save(features: torch.Tensor | DiskFeatures, path: Path, dtype: torch.dtype) -> None:
    """Written to a temporary name and renamed: a run killed mid-write leaves no file to misread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    if isinstance(features, DiskFeatures):
        features.array.flush()
        shutil.copyfile(features.path, tmp)
    else:
        with open(tmp, "wb") as f:
            np.save(f, features.cpu().view(_AS_STORED[dtype]).numpy())
    os.replace(tmp, path)


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
    spill_name: str = "feature_cache",
    upto: str = "projection",
) -> torch.Tensor | DiskFeatures:
    """Features for every example, in order: (N, num_query_tokens, d_lm), or with `upto="vision"` the
    vision encoder's output (N, 1 + patches, d_vision).

    Runs the frozen modules in eval mode (no dropout), as training does, so cached and fresh features agree.
    With several processes each computes an equal, contiguous share and the shares are exchanged, so the pass
    takes 1/world of the time and every process ends up holding the whole cache (any process may draw any
    example in a later epoch).
    """
    n, world, rank = len(examples), accelerator.num_processes, accelerator.process_index
    bounds = [i * n // world for i in range(world + 1)]
    share = range(bounds[rank], bounds[rank + 1])
    # A process with no share (fewer examples than processes) still runs one batch, to learn the row shape.
    loader = DataLoader(
        Subset(examples, share or range(min(1, n))),
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=num_workers,
    )
    was_training = model.training
    model.eval()
    store: _Store | None = None
    done = share.start
    desc = "caching image features" + (f" ({len(share)} of {n} in this process)" if world > 1 else "")
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not accelerator.is_local_main_process):
        pixels = batch["pixel_values"].to(accelerator.device, dtype)
        with accelerator.autocast():
            rows = family.image_features(model, pixels, upto).to(dtype)
        if store is None:
            store = _Store(n, rows.shape[1:], dtype, accelerator, spill_dir and spill_dir / spill_name)
        if share:
            store.write(done, rows)
            done += len(rows)
    model.train(was_training)
    if store is None:  # no examples at all
        raise ValueError("no examples to cache image features for")
    if world > 1:
        store.exchange(bounds, accelerator)
    return store.features


class _Store:
    """Where the cache is built: on the accelerator when small, in host memory when larger, and beyond
    HOST_LIMIT in a memory-mapped file, one per process (each process holds the whole cache)."""

    def __init__(self, n: int, shape: torch.Size, dtype: torch.dtype, accelerator: Any, spill: Path | None):
        self.dtype = dtype
        tier = _tier(n * shape.numel() * torch.empty(0, dtype=dtype).element_size())
        self.features: torch.Tensor | DiskFeatures
        if spill is not None and tier == "disk":  # spill: the file's path without ".RANK.npy"
            path = spill.with_name(f"{spill.name}.{accelerator.process_index}.npy")
            self.features = DiskFeatures(path, (n, *shape), dtype)
        elif tier != "device":
            on_gpu = accelerator.device.type == "cuda"
            self.features = torch.empty((n, *shape), dtype=dtype, pin_memory=on_gpu)
        else:
            self.features = torch.empty((n, *shape), dtype=dtype, device=accelerator.device)

    def write(self, start: int, rows: torch.Tensor) -> None:
        if isinstance(self.features, DiskFeatures):
            self.features.write(start, rows)
        else:
            self.features[start : start + len(rows)] = rows

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.features[torch.arange(start, stop)]

    def exchange(self, bounds: list[int], accelerator: Any) -> None:
        """Every process's share to every process, in rounds of at most EXCHANGE_BYTES per process."""
        from accelerate.utils import gather

        rank, world = accelerator.process_index, len(bounds) - 1
        lengths = [bounds[i + 1] - bounds[i] for i in range(world)]
        row = self.features[torch.tensor([0])]
        chunk = max(1, EXCHANGE_BYTES // (row.numel() * row.element_size()))
        # Sent as raw bytes: NCCL has no int16 and not every gloo build gathers bf16, every backend bytes.
        wire = torch.uint8
        for k in range(0, max(lengths), chunk):
            mine = self.read(
                bounds[rank] + min(k, lengths[rank]), bounds[rank] + min(k + chunk, lengths[rank])
            )
            padded = mine.new_zeros((chunk, *row.shape[1:]))
            padded[: len(mine)] = mine
            everyone = gather(padded.view(wire).to(accelerator.device)).view(self.dtype)
            for i in range(world):
                got = max(0, min(chunk, lengths[i] - k))
                if i != rank and got:
                    self.write(bounds[i] + k, everyone[i * chunk : i * chunk + got])
