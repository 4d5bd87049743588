"""Datasets in: a hub id, a `datasets` directory (save_to_disk), parquet/arrow files, or an image folder with
`metadata.jsonl`/`metadata.csv`. Out: a training split, an optional validation split, and a collator that turns
examples into model inputs through the model family."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(ValueError):
    pass


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with EXIF rotation applied; transparency composited on white (not on black, PIL's default)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def open_image(path: str | os.PathLike) -> Image.Image:
    try:
        with Image.open(path) as im:
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


def load_any(source: str) -> Any:
    """A DatasetDict or Dataset from whatever `source` names: a local path if one exists, else a hub id."""
    import datasets

    path = Path(source)
    if not path.exists():
        try:
            return datasets.load_dataset(source)
        except (ConnectionError, OSError) as e:  # offline, or no such repository
            raise _unreachable(source, e) from e
    if path.is_file() and path.suffix not in (".parquet", ".arrow"):
        raise DataError(f"{path} is a file vlmtune cannot read as a dataset (expected .parquet or .arrow)")
    try:
        if path.is_file():
            return datasets.load_dataset(path.suffix[1:], data_files={"train": str(path)})
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return datasets.load_from_disk(str(path))
        if (path / "metadata.jsonl").exists() or (path / "metadata.csv").exists():
            return datasets.load_dataset("imagefolder", data_dir=str(path))
        for kind in ("parquet", "arrow"):
            files = sorted(str(f) for f in path.rglob(f"*.{kind}"))
            if files:
                return datasets.load_dataset(kind, data_files=_files_by_split(files))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read dataset {path}: {e}") from e
    raise DataError(
        f"{path} is not a dataset vlmtune can read: expected a `datasets` save_to_disk directory, "
        "parquet or arrow files, or images with metadata.jsonl / metadata.csv (file_name + caption)"
    )


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
) -> tuple[Any, Any | None]:
    """(train, validation or None) as `datasets.Dataset`s, with `columns` checked to exist."""
    import datasets

    loaded = load_any(source)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})

    def pick(name: str) -> Any:
        if name not in loaded:
            raise DataError(f"dataset {source} has no split {name!r}; its splits: {', '.join(loaded)}")
        ds = loaded[name]
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise DataError(
                f"dataset {source} (split {name!r}) has no column {', '.join(map(repr, missing))}; its columns: "
                f"{', '.join(ds.column_names)}. Name the right ones with --image-column / --text-column."
            )
        return ds

    train = pick(split)
    if val_split:
        return train, pick(val_split)
    if val_fraction:
        parts = train.train_test_split(test_size=val_fraction, seed=seed)
        return parts["train"], parts["test"]
    return train, None


def column_values(dataset: Any, column: str) -> list[Any]:
    """One column as a list, without decoding the others (a `datasets.Dataset` or a list of dicts)."""
    if hasattr(dataset, "column_names"):
        return list(dataset.select_columns([column])[column])
    return [row[column] for row in dataset]


@dataclass
class CaptionExamples:
    """A torch-style dataset of (image, prompt, target) from a `datasets.Dataset`; images decoded lazily."""

    dataset: Any
    image_column: str = "image"
    text_column: str = "text"
    prompt: str = ""

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.dataset[i]
        image = row[self.image_column]
        if isinstance(image, (str, os.PathLike)):
            image = open_image(image)
        elif isinstance(image, Image.Image):
            image = to_rgb(image)
        else:
            raise DataError(
                f"row {i}, column {self.image_column!r}: expected an image, got {type(image).__name__}"
            )
        text = row[self.text_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                f"row {i}, column {self.text_column!r}: expected a non-empty caption, got {text!r}"
            )
        return {"image": image, "prompt": self.prompt, "target": text, "index": i}


@dataclass
class TextOnlyExamples:
    """(index, prompt, target) without decoding any image: for training on cached image features."""

    texts: list[str]
    prompt: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        text = self.texts[i]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"row {i}: expected a non-empty caption, got {text!r}")
        return {"prompt": self.prompt, "target": text, "index": i}


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
