"""Datasets in: a hub id, a `datasets` directory (save_to_disk), parquet/arrow files, an image folder with
`metadata.jsonl`/`metadata.csv`, COCO captions or a manifest; out: `datasets` splits with their columns checked."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError


def detect(source: str) -> tuple[str, Path | None]:
    """What `source` is: (kind, the file or folder to read). Kinds: hub, datasets-dir, imagefolder, coco,
    manifest, conversations, parquet, arrow."""
    from .formats import find_coco, is_coco, is_conversations

    path = Path(source)
    if not path.exists():
        return "hub", None
    if path.is_file():
        if path.suffix in (".parquet", ".arrow"):
            return path.suffix[1:], path
        if is_conversations(path):
            return "conversations", path
        if path.suffix in (".jsonl", ".csv"):
            return "manifest", path
        if is_coco(path):
            return "coco", path
        raise DataError(
            f"{path} is a file vlmtune cannot read as a dataset: expected a COCO captions .json, a .jsonl or "
            ".csv manifest (image path + text), conversations (.json / .jsonl records with `messages` or "
            "`conversations`), or .parquet / .arrow"
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

    from .formats import load_coco, load_conversations, load_manifest, load_metadata_folder

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
        elif kind == "conversations":
            loaded = load_conversations(path, image_root)
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
    columns: Columns = ("image", "text"),
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


Columns = tuple[str, ...] | Callable[[list[str]], tuple[str, ...]]


def is_conversation(existing: list[str], cfg: Any) -> bool:
    """Whether a split with these columns is read as conversations: it has the messages column and no text
    column (a caption split that also has a `messages` column stays a caption split)."""
    messages = getattr(cfg, "messages_column", None)
    return messages is not None and messages in existing and cfg.text_column not in existing


def required_columns(cfg: Any) -> Callable[[list[str]], tuple[str, ...]]:
    """The columns a split must have, by its layout: a conversation split its messages (the images may be
    inside them); a caption split its image and text (and question) columns."""

    def need(existing: list[str]) -> tuple[str, ...]:
        if is_conversation(existing, cfg):
            return (cfg.messages_column,)
        question = getattr(cfg, "question_column", None)
        return (cfg.image_column, cfg.text_column) + ((question,) if question else ())

    return need


def pick_split(loaded: Any, source: str, name: str, columns: Columns) -> Any:
    """Split `name` of `loaded`, with `columns` checked to exist (a tuple, or a function of the split's
    columns for a choice of layouts); the error lists what does exist."""
    if name not in loaded:
        raise DataError(f"dataset {source} has no split {name!r}; its splits: {', '.join(loaded)}")
    ds = loaded[name]
    existing = ds.column_names
    if existing is None:  # a stream that declares no features: its first record says
        first = next(iter(ds), None)
        if first is None:
            raise DataError(f"dataset {source} (split {name!r}) is empty")
        existing = list(first)
    wanted = columns(list(existing)) if callable(columns) else columns
    missing = [c for c in wanted if c not in existing]
    if missing:
        raise DataError(
            f"dataset {source} (split {name!r}) has no column {', '.join(map(repr, missing))}; its columns: "
            f"{', '.join(existing)}. Name the right ones with --image-column / --text-column (captions) or "
            "--messages-column / --images-column (conversations)."
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
