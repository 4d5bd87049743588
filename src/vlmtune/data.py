"""Datasets in: a hub id, a `datasets` directory (save_to_disk), parquet/arrow files, or an image folder with
`metadata.jsonl`/`metadata.csv`. Out: a training split, an optional validation split, and a collator that turns
examples into model inputs through the model family."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from .errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with EXIF rotation applied; transparency composited on white (not on black, PIL's default); 16-bit
    and float greyscale scaled to 8 bits (PIL's own conversion clips them); CMYK and palettes converted.
    The original mode stays in `.info["source_mode"]`."""
    source = image.mode
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
    elif image.mode.startswith(("I", "F")):
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" and values.max() <= 1.0 else 65535.0 if values.max() > 255 else 255.0
        out = Image.fromarray(np.clip(values / top * 255.0, 0, 255).astype(np.uint8), "L").convert("RGB")
    else:
        out = image.convert("RGB")
    out.info["source_mode"] = source
    return out


MAX_PIXELS = 100_000_000  # a decompression-bomb guard: 10k x 10k is plenty for any captioning model


def open_image(path: str | os.PathLike | io.BytesIO) -> Image.Image:
    try:
        with Image.open(path) as im:
            # The header alone gives the size: refuse a decompression bomb before decoding a byte of it.
            if im.width * im.height > MAX_PIXELS:
                raise DataError(
                    f"image {path} has {im.width}x{im.height} pixels, over the limit of {MAX_PIXELS:,} "
                    "(a decompression bomb?); shrink it"
                )
            im.load()
            return to_rgb(im)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise DataError(f"image {path} cannot be read: {e}") from None


def expand_images(paths: list[str]) -> list[Path]:
    """Image files named directly, plus the images inside named folders (recursively, sorted)."""
    if not paths:
        raise DataError("no images given")
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
            if not inside:
                raise DataError(f"folder {p} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            found += inside
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"image {p} does not exist")
    return found


def detect(source: str) -> tuple[str, Path | None]:
    """What `source` is: (kind, the file or folder to read). Kinds: hub, datasets-dir, imagefolder, coco,
    manifest, parquet, arrow."""
    from .formats import find_coco, is_coco

    path = Path(source)
    if not path.exists():
        return "hub", None
    if path.is_file():
        if path.suffix in (".parquet", ".arrow"):
            return path.suffix[1:], path
        if path.suffix in (".jsonl", ".csv"):
            return "manifest", path
        if is_coco(path):
            return "coco", path
        raise DataError(
            f"{path} is a file vlmtune cannot read as a dataset: expected a COCO captions .json, a .jsonl or "
            ".csv manifest (image path + text), or .parquet / .arrow"
        )
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return "datasets-dir", path
    if (path / "metadata.jsonl").exists() or (path / "metadata.csv").exists():
        return "imagefolder", path
    coco = find_coco(path)
    if coco is not None:
        return "coco", coco
    for kind in ("parquet", "arrow"):
        if next(path.rglob(f"*.{kind}"), None) is not None:
            return kind, path
    raise DataError(
        f"{path} is not a dataset vlmtune can read: expected a `datasets` save_to_disk directory, parquet or "
        "arrow files, images with metadata.jsonl / metadata.csv (file_name + caption), a COCO captions "
        "annotations .json (with its images beside it or in images/), or a .jsonl / .csv manifest"
    )


def load_any(source: str, image_root: str | None = None, streaming: bool = False) -> Any:
    """A DatasetDict or Dataset from whatever `source` names: a local path if one exists, else a hub id.

    With `streaming`, the iterable versions: hub, parquet, arrow and image folders are read file by file as
    they are iterated (nothing downloaded up front); the rest, already on disk as Arrow or read from small
    index files, become streams of up to 64 shards (what DataLoader workers split between them).
    """
    import datasets

    from .formats import load_coco, load_manifest, load_metadata_folder

    kind, path = detect(source)
    if kind == "hub":
        try:
            return datasets.load_dataset(source, streaming=streaming)
        except (ConnectionError, OSError) as e:  # offline, or no such repository
            raise _unreachable(source, e) from e
    try:
        if kind == "imagefolder":
            # Read here only when a value has the wrong type, so that it is one more bad record.
            loaded = load_metadata_folder(path)
            if loaded is None:
                return datasets.load_dataset("imagefolder", data_dir=str(path), streaming=streaming)
        elif kind in ("parquet", "arrow"):
            files = [str(path)] if path.is_file() else sorted(str(f) for f in path.rglob(f"*.{kind}"))
            return datasets.load_dataset(kind, data_files=_files_by_split(files), streaming=streaming)
        elif kind == "coco":
            loaded = load_coco(path, image_root)
        elif kind == "manifest":
            loaded = load_manifest(path)
        else:
            loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot read dataset {path}: {e}") from e
    if not streaming:
        return loaded

    def stream(ds: Any) -> Any:  # shards are what DataLoader workers split between them
        return ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds))))

    if isinstance(loaded, datasets.Dataset):
        return stream(loaded)
    return datasets.IterableDatasetDict({k: stream(v) for k, v in loaded.items()})


def _unreachable(source: str, err: Exception) -> DataError:
    return DataError(
        f"cannot load dataset {source!r}: it is not a local path, and the Hugging Face Hub could not be reached or "
        f"has no such dataset ({type(err).__name__}).\nTo use a local copy: on a machine with network, "
        f"`datasets.load_dataset({source!r}).save_to_disk('DIR')`, copy DIR here and pass `--data DIR`."
    )


def _files_by_split(files: list[str]) -> dict[str, list[str]]:
    # The hub's layout names files after their split (data/train-00000-of-00001.parquet).
    splits: dict[str, list[str]] = {}
    for f in files:
        name = Path(f).name
        split = next((s for s in ("train", "validation", "test") if name.startswith(s)), "train")
        splits.setdefault(split, []).append(f)
    return splits


def load_splits(
    source: str,
    split: str = "train",
    val_split: str | None = None,
    val_fraction: float = 0.0,
    columns: tuple[str, ...] = ("image", "text"),
    seed: int = 42,
    image_root: str | None = None,
) -> tuple[Any, Any | None]:
    """(train, validation or None) as `datasets.Dataset`s, with `columns` checked to exist."""
    loaded = load_dict(source, image_root)

    def pick(name: str) -> Any:
        return pick_split(loaded, source, name, columns)

    train = pick(split)
    if val_split:
        return train, pick(val_split)
    if val_fraction:
        held_out = held_out_rows(len(train), val_fraction, seed)
        keep = sorted(set(range(len(train))) - set(held_out))
        return train.select(keep), train.select(held_out)
    return train, None


def load_dict(source: str, image_root: str | None = None, streaming: bool = False) -> Any:
    """`load_any` as a (Iterable)DatasetDict (a single dataset becomes its "train" split)."""
    import datasets

    loaded = load_any(source, image_root, streaming)
    if isinstance(loaded, datasets.Dataset):
        return datasets.DatasetDict({"train": loaded})
    if isinstance(loaded, datasets.IterableDataset):
        return datasets.IterableDatasetDict({"train": loaded})
    return loaded


def pick_split(loaded: Any, source: str, name: str, columns: tuple[str, ...]) -> Any:
    """Split `name` of `loaded`, with `columns` checked to exist; the error lists what does exist."""
    if name not in loaded:
        raise DataError(f"dataset {source} has no split {name!r}; its splits: {', '.join(loaded)}")
    ds = loaded[name]
    existing = ds.column_names
    if existing is None:  # a stream that declares no features: its first record says
        first = next(iter(ds), None)
        if first is None:
            raise DataError(f"dataset {source} (split {name!r}) is empty")
        existing = list(first)
    missing = [c for c in columns if c not in existing]
    if missing:
        raise DataError(
            f"dataset {source} (split {name!r}) has no column {', '.join(map(repr, missing))}; its columns: "
            f"{', '.join(existing)}. Name the right ones with --image-column / --text-column."
        )
    return ds


def held_out_rows(n: int, fraction: float, seed: int) -> list[int]:
    """The validation rows of a --val-fraction split: a function of (n, fraction, seed) alone, so a resumed or
    repeated run holds out the same ones (they are also written to RUN_DIR/split.json)."""
    count = max(1, round(n * fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:count])


def iter_column(dataset: Any, column: str, chunk: int = 256) -> Iterator[Any]:
    """One column's values, a chunk at a time, without decoding the others: memory stays flat however many
    records there are (a `datasets.Dataset` or a list of dicts)."""
    if not hasattr(dataset, "column_names"):
        yield from (row[column] for row in dataset)
        return
    for batch in dataset.select_columns([column]).iter(batch_size=chunk):
        yield from batch[column]


def column_values(dataset: Any, column: str) -> list[Any]:
    """One column as a list, without decoding the others."""
    return list(iter_column(dataset, column))


def as_image(value: Any, where: str) -> Image.Image:
    """A dataset cell as an RGB image: a PIL image, a path, or {"bytes"/"path"} as `datasets` stores them."""
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
    if isinstance(value, (str, os.PathLike, io.BytesIO)):
        return open_image(value)
    if isinstance(value, Image.Image):
        return to_rgb(value)
    raise DataError(f"{where}: expected an image, got {type(value).__name__}")


def file_of(value: Any) -> str | None:
    """The file an image cell names: a path, or `datasets`' {"path": ...} (None for bytes alone)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("path")
    return None


def targets_of(value: Any) -> list[str]:
    """A text cell as its list of targets: one caption, or several (COCO, VQA answers)."""
    return [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class Prompting:
    """Where each example's prompt comes from: a fixed --prompt, or a question column through the template."""

    prompt: str = ""
    question_column: str | None = None
    template: str = "Question: {question} Answer:"

    def __call__(self, row: dict[str, Any]) -> str:
        if self.question_column is None:
            return self.prompt
        return self.template.format(question=str(row[self.question_column]).strip())


class CaptionExamples:
    """(image, prompt, target) examples from a `datasets.Dataset`, images decoded lazily.

    A row with several targets (COCO's captions, VQA's answers) gives one example per target; `per_image`
    gives one example per row instead (the first target), for work done once per image.
    """

    def __init__(
        self,
        dataset: Any,
        image_column: str = "image",
        text_column: str = "text",
        prompting: Prompting | None = None,
        per_image: bool = False,
    ):
        self.dataset, self.image_column, self.text_column = dataset, image_column, text_column
        self.prompting = prompting or Prompting()
        texts = column_values(dataset, text_column)
        self.pairs = (
            [(i, targets_of(t)[0]) for i, t in enumerate(texts)]
            if per_image
            else [(i, t) for i, value in enumerate(texts) for t in targets_of(value)]
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, text = self.pairs[k]
        row = self.dataset[i]
        image = as_image(row[self.image_column], f"row {i}, column {self.image_column!r}")
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                f"row {i}, column {self.text_column!r}: expected a non-empty caption, got {text!r}"
            )
        return {"image": image, "prompt": self.prompting(row), "target": text, "index": i}

    def epoch_order(self, seed: int, batch_size: int, *, one_caption: bool, by_length: bool) -> EpochSampler:
        """The sampler of each epoch's order (one caption per image, batches of similar length, as asked)."""
        return EpochSampler(
            len(self),
            seed,
            groups=self.groups() if one_caption else None,
            lengths=self.target_lengths() if by_length else None,
            batch_size=batch_size,
        )

    def workers(self, asked: int) -> int:
        """DataLoader workers that get a share: all of them, for a map-style split."""
        return asked

    def head(self, n: int) -> list[dict[str, Any]]:
        """The first `n` examples: fixed samples to caption during training."""
        return [self[i] for i in range(min(n, len(self)))]

    def groups(self) -> list[list[int]]:
        """Example indices by image (row), for drawing one caption per image."""
        by_row: dict[int, list[int]] = {}
        for k, (i, _) in enumerate(self.pairs):
            by_row.setdefault(i, []).append(k)
        return list(by_row.values())

    def target_lengths(self) -> list[int]:
        """Each example's target length in characters: a cheap stand-in for tokens, for grouping by length."""
        return [len(t) if isinstance(t, str) else 0 for _, t in self.pairs]

    def without_images(self) -> TextOnlyExamples:
        """The same examples, in the same order, with no image decoded (for cached image features)."""
        column = self.prompting.question_column
        prompts = (
            [self.prompting({column: q}) for q in column_values(self.dataset, column)]
            if column
            else [self.prompting.prompt] * len(self.dataset)
        )
        return TextOnlyExamples([(i, prompts[i], t) for i, t in self.pairs])


@dataclass
class TextOnlyExamples:
    """(index, prompt, target) without decoding any image: for training on cached image features."""

    items: list[tuple[int, str, str]]  # (row, prompt, target)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, prompt, text = self.items[k]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"row {i}: expected a non-empty caption, got {text!r}")
        return {"prompt": prompt, "target": text, "index": i}


@dataclass
class Collator:
    """Examples -> model inputs with labels, via the family (so every family masks its own way)."""

    family: Any
    processor: Any
    max_length: int
    cached: bool = False  # images come from a feature cache: send their indices, not pixels

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        prompts, targets = [e["prompt"] for e in examples], [e["target"] for e in examples]
        if self.cached:
            batch = self.family.encode_text(
                self.processor, prompts, targets, max_length=self.max_length, padding_side="right"
            )
            batch["image_index"] = torch.tensor([e["index"] for e in examples])
            return batch
        images = [e["image"] for e in examples]
        return self.family.encode(
            self.processor, images, prompts, targets, max_length=self.max_length, padding_side="right"
        )


class EpochSampler(torch.utils.data.Sampler):
    """Example indices for one epoch, drawn from (seed, epoch) alone, so a resumed run sees the same batches;
    `position` also skips what an interrupted epoch already consumed.

    groups: example indices per image; given, each epoch takes one example of each image, drawn at random
        (one caption per image per epoch instead of every pair).
    lengths: given, the shuffled order is cut into spans of 50 batches and each span sorted longest first,
        so a batch holds examples of similar length (less padding) while the epoch stays random; the longest
        batches come early, so running out of memory happens at once if at all.
    """

    SPAN = 50  # batches per sorted span

    def __init__(
        self,
        n: int,
        seed: int,
        *,
        groups: list[list[int]] | None = None,
        lengths: list[int] | None = None,
        batch_size: int = 1,
    ):
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0
        self.groups, self.lengths, self.batch_size = groups, lengths, batch_size

    def position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.groups is None:
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            draw = torch.rand(len(self.groups), generator=g).tolist()
            picks = [grp[int(r * len(grp))] for grp, r in zip(self.groups, draw, strict=True)]
            order = [picks[i] for i in torch.randperm(len(picks), generator=g).tolist()]
        if self.lengths is not None:
            span, lengths = self.SPAN * self.batch_size, self.lengths
            order = [
                i
                for k in range(0, len(order), span)
                for i in sorted(order[k : k + span], key=lambda i: -lengths[i])
            ]
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return (self.n if self.groups is None else len(self.groups)) - self.start
