"""One process of the shared feature-cache test (tests/test_distributed.py), started by torchrun, or alone for
the reference: builds the image-feature cache of a dataset's train split with the tiny base and saves it, with
the number of images this process itself ran through the vision side and the files (device, inode) it has
mapped that hold features, as OUT_DIR/CASE/rank{N}.pt, for each of the comma-separated CASES (one launch for
them all: starting two processes costs more than a case). A case names its settings by words: `kept` (kept in a directory,
then read back from it), `apart` (as if each process ran on a machine of its own), `disk` (too big for memory),
`bf16` (in bfloat16), `ragged` (features of a varying number of tokens per image, as a dynamic-resolution
vision encoder gives: each image keeps its first 1..n feature rows, by its pixels)."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForImageTextToText, AutoProcessor

import vlmtune.training.cache as cache
from vlmtune.data.batching import Collator
from vlmtune.data.examples import CaptionExamples
from vlmtune.data.sources import load_splits
from vlmtune.families import family_for
from vlmtune.modeling import TINY_PATH


def main(data: str, out_dir: str, cases: str) -> None:
    accelerator = Accelerator(cpu=True)
    train_set, _ = load_splits(data)
    processor = AutoProcessor.from_pretrained(TINY_PATH)
    models = {}
    defaults = (cache.HOST_LIMIT, cache._processes_here)
    for where in cases.split(","):
        cache.HOST_LIMIT, cache._processes_here = defaults  # each case starts from the real settings
        dtype = torch.bfloat16 if "bf16" in where else torch.float32
        if dtype not in models:
            models[dtype] = AutoModelForImageTextToText.from_pretrained(TINY_PATH, dtype=dtype)
        run_case(accelerator, models[dtype], processor, train_set, Path(out_dir) / where, where, dtype)
    accelerator.end_training()  # a process group left to exit-time destructors can abort the process


def run_case(accelerator, model, processor, train_set, out: Path, where: str, dtype: torch.dtype) -> None:
    out.mkdir(parents=True, exist_ok=True)
    family = family_for(model.config)
    seen = []
    image_features = family.image_features
    family.image_features = lambda m, batch, *a: (
        seen.append(len(batch["pixel_values"])) or image_features(m, batch, *a)
    )
    if "ragged" in where:
        family.image_features = ragged(family.image_features)
    if "disk" in where:
        cache.HOST_LIMIT = 0  # as if the features were too big for RAM
    if "apart" in where:
        cache._processes_here = lambda accelerator: 1
    cache.EXCHANGE_BYTES = 1  # the shares change hands a row at a time: every round is exercised
    args = (model, family, Collator(family, processor, 48), CaptionExamples(train_set, per_image=True))
    settings = dict(dtype=dtype, accelerator=accelerator, batch_size=8, spill_dir=out)
    if where.startswith("kept"):  # twice: computed together and kept, then read by every process
        cache.kept_features(*args, keep_dir=out / "kept", **settings)
        images = sum(seen) - 1  # each call also runs the probe image that names the file
        features, said = cache.kept_features(*args, keep_dir=out / "kept", **settings)
        assert sum(seen) == images + 2 and said.startswith("read from"), said
    else:
        features = cache.build_feature_cache(*args, **settings)
        images = sum(seen)
    result = {
        "features": features[torch.arange(len(features))],
        "images": images,
        "kind": type(features),
        "mapped": mapped(out),
    }
    torch.save(result, out / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()  # no process starts the next case while another still reads this one


def ragged(image_features):
    """Per-image features of varying length: image i keeps its first 1 + (a function of its pixels) rows."""

    def varying(model, batch, *args):
        rows = image_features(model, batch, *args)
        pixels = batch["pixel_values"]
        keep = [1 + int(p.float().sum().abs() * 1000) % len(r) for p, r in zip(pixels, rows, strict=True)]
        return [r[:k] for r, k in zip(rows, keep, strict=True)]

    return varying


def mapped(under: Path) -> set[tuple[str, int]]:
    """(device, inode) of the .npy files under `under` this process has mapped, removed from their directory
    or not (the maps still name a removed file by its path)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {
        (f[3], int(f[4]))
        for f in map(str.split, lines)
        if len(f) > 5 and ".npy" in f[5] and f[5].startswith(str(under.resolve()))
    }


if __name__ == "__main__":
    main(*sys.argv[1:])
