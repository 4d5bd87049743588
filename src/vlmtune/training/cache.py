"""Image features computed once: with the vision side frozen, every epoch would recompute the same thing.

For BLIP-2 OPT-2.7B the frozen ViT-g forward is about half of each training sample's FLOPs (0.52 of ~1.1 TFLOP),
so over the seed recipe's 11 epochs caching it removes ten of eleven of those passes. The cache holds what the
language model receives in place of the image placeholders, (N, tokens, d_lm) in the model's dtype, or, when a
module after the vision encoder trains (or reads the text), the vision encoder's output alone, and the modules
after it run on it each step: as far along the image path as the family's `cache_level` says nothing changes.
An example may give features of any length (a dynamic-resolution vision encoder, tiles, several images): they
are then stored as rows one token each, example after example, with per-example offsets (`Ragged`), through
the same tiers and exchange. Where the tokens an image gives follow its size, the text is laid out without it
from a stand-in of the same size: each example's image sizes are kept with its features. Several processes
fill it together; `--feature-cache-dir` keeps it for later runs on the same model and data.

Where it lives follows its size (`_tier`). Beyond what host memory should hold, or off the accelerator when
several processes share a machine, it is one memory-mapped file per machine that every process of the machine
writes its share into and reads from (one copy in the page cache, not one per process, and nothing to
exchange), and the file leaves the directory as soon as every process has it open, so no run, however it ends,
leaves a spill file behind. Kept features are written in place under a temporary name and renamed when
complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..atomic import remove_abandoned, temporary, write_file, write_text
from ..data.examples import Dialogue
from ..families import Family, to_model

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
    def open(cls, path: Path, dtype: torch.dtype, mode: str = "r") -> DiskFeatures:
        """An existing file: read-only, or with mode "r+" to write rows into it too."""
        store = cls.__new__(cls)
        store.path, store.dtype, store.array = path, dtype, np.load(path, mmap_mode=mode)
        return store

    def write(self, start: int, rows: torch.Tensor) -> None:
        self.array[start : start + len(rows)] = rows.cpu().contiguous().view(_AS_STORED[self.dtype]).numpy()

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[index.cpu().numpy()])).view(self.dtype)

    def __len__(self) -> int:
        return len(self.array)


class Ragged:
    """Cached features of any length per image: `rows` (total rows, *rest) in any tier (a tensor or a
    `DiskFeatures`) and `offsets` (N + 1,): image i's features are rows offsets[i]:offsets[i + 1]. For a family
    whose images give a varying number of feature tokens (a dynamic-resolution vision encoder); a family
    whose images all give the same shape gets a plain (N, *shape) store instead."""

    def __init__(self, rows: torch.Tensor | DiskFeatures, offsets: torch.Tensor):
        self.rows, self.offsets = rows, offsets
        self.device = rows.device

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: torch.Tensor) -> list[torch.Tensor]:
        """Each indexed image's features: a list of (n_i, *rest) tensors."""
        bounds = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in index.tolist()]
        rows = self.rows[torch.cat([torch.arange(a, b) for a, b in bounds]).to(self.device)]
        return list(rows.split([b - a for a, b in bounds]))


def _offsets_file(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".npy") + ".offsets.npy")


def _sizes_file(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".npy") + ".sizes.json")


def _collate_with_sizes(collate: Any) -> Any:
    """`collate`, and the (width, height) of each example's images, which the text's layout may need later."""

    def run(examples: list[dict[str, Any]]) -> tuple[dict[str, Any], list[list[tuple[int, int]]]]:
        return collate(examples), [[image.size for image in x["images"]] for x in examples]

    return run


def wants_cache(cfg: Any, family: Family, model: Any) -> tuple[str | None, str]:
    """(what to cache, why) for a training config: as far along the image path as nothing trains (the
    family's `cache_level`: "projection", "vision"), or None."""
    if cfg.vision_cache == "off":
        return None, "--vision-cache off"
    if getattr(cfg, "streaming", False):
        return None, "--streaming: each image is decoded when the stream reaches it"
    return family.cache_level(cfg.groups(), model)


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
    sizes: list | None = None,
    **build: Any,
) -> tuple[torch.Tensor | DiskFeatures | Ragged, str]:
    """`build_feature_cache`, read from `keep_dir` when an earlier run on the same model and data left the
    features there (and leaves them there for the next one otherwise). Returns (features, what happened, or
    "" without a `keep_dir`); `sizes` gets each example's image sizes."""
    key = store_key(model, family, collate, examples, dtype, accelerator, upto) if keep_dir else None
    build |= dict(dtype=dtype, accelerator=accelerator, upto=upto, sizes=sizes)
    if key is None:
        why = "" if keep_dir is None else "not kept: the data has no `datasets` fingerprint to name them by"
        return build_feature_cache(model, family, collate, examples, **build), why
    path = Path(keep_dir) / f"{key}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        remove_abandoned(path.parent)
    kept_sizes = _kept_sizes(path, len(examples))
    found = kept_sizes is not None
    if accelerator.num_processes > 1:  # all read, or all compute together: the pass exchanges shares
        flag = torch.tensor([int(found)], device=accelerator.device)
        found = bool(accelerator.reduce(flag, "sum").item() == accelerator.num_processes)
    if found:
        if sizes is not None:
            sizes.extend(kept_sizes)
        return _load(path, dtype, accelerator), f"read from {path}"
    return build_feature_cache(model, family, collate, examples, keep_as=path, **build), f"kept in {path}"


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
    batch = collate([Dialogue("", "a probe").example([probe], 0)])
    was_training = model.training
    model.eval()
    with accelerator.autocast():
        rows = family.image_features(model, to_model(batch, accelerator.device, dtype), upto)
        rows = (torch.cat(list(rows)) if isinstance(rows, (list, tuple)) else rows).to(dtype)
    model.train(was_training)
    digest = hashlib.sha256(rows.float().cpu().numpy().tobytes())
    digest.update(json.dumps([fingerprint, len(examples), examples.image_column, str(dtype), upto]).encode())
    key = [digest.hexdigest()[:32]]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(key)
    return key[0]


def _kept_sizes(path: Path, n: int) -> list[list[tuple[int, int]]] | None:
    """The image sizes kept beside `path`'s features, if the features are complete for `n` examples (else
    None: they are computed again)."""
    try:
        kept = [[tuple(size) for size in row] for row in json.loads(_sizes_file(path).read_text())]
        rows = np.load(path, mmap_mode="r").shape[0]
        if not _offsets_file(path).exists():
            return kept if rows == n == len(kept) else None
        offsets = np.load(_offsets_file(path))
        return kept if len(offsets) == n + 1 == len(kept) + 1 and int(offsets[-1]) == rows else None
    except (OSError, ValueError):
        return None


def _load(path: Path, dtype: torch.dtype, accelerator: Any) -> torch.Tensor | DiskFeatures | Ragged:
    """Kept features where `build_feature_cache` would have put them: device, host memory or the file."""
    if _offsets_file(path).exists():
        return Ragged(_load_rows(path, dtype, accelerator), torch.from_numpy(np.load(_offsets_file(path))))
    return _load_rows(path, dtype, accelerator)


def _load_rows(path: Path, dtype: torch.dtype, accelerator: Any) -> torch.Tensor | DiskFeatures:
    stored = DiskFeatures.open(path, dtype)
    tier = _tier(stored.array.nbytes, accelerator.device, _processes_here(accelerator))
    if tier == "disk":
        return stored
    features = torch.from_numpy(np.array(stored.array)).view(dtype)
    if tier == "host":
        return features.pin_memory() if accelerator.device.type == "cuda" else features
    return features.to(accelerator.device)


def _tier(nbytes: int, device: torch.device, processes_here: int = 1) -> str:
    """Where a cache of this size lives: "device" (the accelerator's memory), "host" memory, or "disk" (a file
    mapped into memory). Every process reads the whole cache: in host memory each would hold a copy, so the
    processes of one machine share one file instead (in the page cache while memory allows)."""
    if device.type != "cpu" and nbytes <= ON_DEVICE_LIMIT:
        return "device"
    return "disk" if processes_here > 1 or nbytes > HOST_LIMIT else "host"


def _processes_here(accelerator: Any) -> int:
    """How many of the run's processes run on this machine (they can share memory-mapped files)."""
    if accelerator.num_processes == 1:
        return 1
    from accelerate.utils import gather_object

    host = socket.gethostname()
    return gather_object([host]).count(host)


def _save(features: torch.Tensor | DiskFeatures, path: Path, dtype: torch.dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = features.cpu().view(_AS_STORED[dtype]) if torch.is_tensor(features) else features
    array = stored.array if isinstance(stored, DiskFeatures) else stored.numpy()
    write_file(path, lambda f: np.save(f, array))


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
    keep_as: Path | None = None,
    sizes: list | None = None,
) -> torch.Tensor | DiskFeatures | Ragged:
    """Features for every example, in order: (N, tokens, d_lm), or with `upto="vision"` the
    vision encoder's output (N, 1 + patches, d_vision), or `Ragged` where they vary in length. With
    `keep_as`, also written there for later runs; `sizes` gets each example's image sizes, (w, h) each.

    Runs the frozen modules in eval mode (no dropout), as training does, so cached and fresh features agree.
    With several processes each computes an equal, contiguous share, so the pass takes 1/world of the time,
    and every process ends up holding the whole cache (any process may draw any example in a later epoch): the
    shares are exchanged, or, in a file the processes of one machine share, each writes its own.
    """
    n, world, rank = len(examples), accelerator.num_processes, accelerator.process_index
    bounds = [i * n // world for i in range(world + 1)]
    share = range(bounds[rank], bounds[rank + 1])
    # A process with no share (fewer examples than processes) still runs one batch, to learn the row shape.
    loader = DataLoader(
        Subset(examples, share or range(min(1, n))),
        batch_size=batch_size,
        collate_fn=_collate_with_sizes(collate),
        num_workers=num_workers,
    )
    where = dict(
        spill=spill_dir and spill_dir / spill_name, keep_as=keep_as, here=_processes_here(accelerator)
    )
    was_training = model.training
    model.eval()
    store: _Store | None = None
    ragged: list[torch.Tensor] | None = None  # this share's per-example features, when their lengths vary
    shown: list[list[tuple[int, int]]] = []  # this share's image sizes
    done = share.start
    desc = "caching image features" + (f" ({len(share)} of {n} in this process)" if world > 1 else "")
    try:
        for batch, held in tqdm(
            loader, desc=desc, unit="batch", disable=not accelerator.is_local_main_process
        ):
            with accelerator.autocast():
                rows = family.image_features(model, to_model(batch, accelerator.device, dtype), upto)
            shown += held if share else []
            if isinstance(rows, (list, tuple)):  # one tensor per example, each of its own length
                ragged = (ragged or []) + ([r.to(dtype).cpu() for r in rows] if share else [])
                rest = rows[0].shape[1:]
                continue
            rows = rows.to(dtype)
            if store is None:
                store = _Store(n, rows.shape[1:], dtype, accelerator, **where)
            if share:
                store.write(done, rows)
                done += len(rows)
        offsets = None
        if ragged is not None:
            store, offsets, bounds = _ragged_store(ragged, rest, bounds, dtype, accelerator, where)
        if store is None:  # no examples at all
            raise ValueError("no examples to cache image features for")
        if world > 1:
            store.exchange(bounds, accelerator)
            from accelerate.utils import gather_object

            shown = [row for part in gather_object([shown]) for row in part]  # in rank order
        if sizes is not None:
            sizes.extend(shown)
        if keep_as is not None:
            if accelerator.is_main_process:  # before the rows: they mark it complete
                write_text(_sizes_file(keep_as), json.dumps(shown))
                if offsets is not None:
                    write_file(_offsets_file(keep_as), lambda f: np.save(f, offsets.numpy()))
            store.keep(keep_as, accelerator)
    except BaseException:
        if store is not None:
            store.discard()
        raise
    finally:
        model.train(was_training)
    return store.features if offsets is None else Ragged(store.features, offsets)


def _ragged_store(
    features: list[torch.Tensor],
    rest: torch.Size,
    bounds: list[int],
    dtype: torch.dtype,
    accelerator: Any,
    where: dict,
) -> tuple[_Store, torch.Tensor, list[int]]:
    """The store for per-image features of varying length, once every process's lengths are known: one row
    per feature token, laid out image after image; this process's share written in. Returns the store, the
    offsets (N + 1,) and each process's share in rows (what `exchange` hands around)."""
    lengths = [len(f) for f in features]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        lengths = [k for share in gather_object([lengths]) for k in share]  # in rank order
    offsets = torch.tensor([0, *lengths], dtype=torch.long).cumsum(0)
    store = _Store(int(offsets[-1]), rest, dtype, accelerator, **where)
    start = int(offsets[bounds[accelerator.process_index]])
    for f in features:
        store.write(start, f)
        start += len(f)
    return store, offsets, [int(offsets[b]) for b in bounds]


class _Store:
    """Where the cache is built (see `_tier`): on the accelerator when small, in host memory when larger, and
    beyond that in a memory-mapped file: in the spill directory, or with `keep_as` under its temporary name.
    The processes of one machine share the file; on several machines, each process has its own."""

    def __init__(
        self,
        n: int,
        shape: torch.Size,
        dtype: torch.dtype,
        accelerator: Any,
        spill: Path | None,
        keep_as: Path | None,
        here: int,
    ):
        self.dtype, self.shared, self.tmp = dtype, False, None
        tier = _tier(n * shape.numel() * torch.empty(0, dtype=dtype).element_size(), accelerator.device, here)
        self.features: torch.Tensor | DiskFeatures
        if tier == "disk" and (spill or keep_as):
            self.features = self._file((n, *shape), accelerator, spill, keep_as, here)
        elif tier == "host":
            on_gpu = accelerator.device.type == "cuda"
            self.features = torch.empty((n, *shape), dtype=dtype, pin_memory=on_gpu)
        else:
            self.features = torch.empty((n, *shape), dtype=dtype, device=accelerator.device)

    def _file(
        self, shape: tuple[int, ...], accelerator: Any, spill: Path | None, keep_as: Path | None, here: int
    ) -> DiskFeatures:
        """The main process creates the file and the others on its machine open it; a spill file is then
        removed from its directory at once (it lives on while mapped: no run leaves one behind, however it
        ends); a file to keep stays, under a temporary name until `keep`."""
        self.shared = here == accelerator.num_processes
        if not self.shared:  # several machines: a file of its own for each process, exchanged like memory
            rank = accelerator.process_index
            path = temporary(keep_as) if spill is None else spill.with_name(f"{spill.name}.{rank}.npy")
            features = DiskFeatures(path, shape, self.dtype)
            path.unlink()
            return features
        path = [temporary(keep_as) if keep_as is not None else spill.with_name(f"{spill.name}.npy")]
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(path)  # the main process's name: its pid names a temporary file
        path = path[0]
        if accelerator.is_main_process:
            features = DiskFeatures(path, shape, self.dtype)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            features = DiskFeatures.open(path, self.dtype, mode="r+")
        accelerator.wait_for_everyone()
        if keep_as is not None:
            self.tmp = path
        elif accelerator.is_main_process:
            path.unlink()
        return features

    def write(self, start: int, rows: torch.Tensor) -> None:
        if isinstance(self.features, DiskFeatures):
            self.features.write(start, rows)
        else:
            self.features[start : start + len(rows)] = rows

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.features[torch.arange(start, stop)]

    def exchange(self, bounds: list[int], accelerator: Any) -> None:
        """Every process's share to every process, in rounds of at most EXCHANGE_BYTES per process; in a
        shared file, each process wrote its own share, and it is enough that all have finished."""
        if self.shared:
            accelerator.wait_for_everyone()
            return
        from accelerate.utils import gather

        rank, world = accelerator.process_index, len(bounds) - 1
        lengths = [bounds[i + 1] - bounds[i] for i in range(world)]
        row = self.features[torch.tensor([0])]
        chunk = min(max(lengths), max(1, EXCHANGE_BYTES // (row.numel() * row.element_size())))
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

    def keep(self, path: Path, accelerator: Any) -> None:
        """Kept for later runs: the file built in place renamed once every share is in, or written out."""
        if self.tmp is not None:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                self.features.array.flush()
                os.replace(self.tmp, path)
            self.tmp = None
        elif accelerator.is_main_process:
            _save(self.features, path, self.dtype)

    def discard(self) -> None:
        """A failed pass: its temporary file goes (a spill file is already out of its directory)."""
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


def with_features(
    batch: dict[str, Any], features: Any, upto: str | None, family: Family, model: Any, device: torch.device
) -> dict[str, Any]:
    """`batch` with its images' cached features in place of pixels: (B,) row indices -> forward() arguments."""
    index = batch.pop("image_index").to(features.device)
    got = features[index]  # (B, *shape), or a list of (n_i, *rest) for features of varying length
    got = [g.to(device) for g in got] if isinstance(got, list) else got.to(device, non_blocking=True)
    batch.update(family.cached_inputs(got, model, upto, batch))
    return batch
