"""Dataset layouts beyond what `datasets` reads by itself: COCO captions, JSONL / CSV manifests and
conversation files (LLaVA JSON, ShareGPT / OpenAI messages in .json or .jsonl).

A caption layout becomes a `datasets.Dataset` with an `image` column of absolute paths and a `text` column (a
list of captions for COCO, one row per image, so evaluation keeps every reference and training makes a pair of
each), plus `question` / `answer` when a manifest has them. A conversation file becomes `messages` (each
record's messages as JSON text, read by `conversations.parse`) and `images` (absolute paths, or data URIs).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ..errors import DataError

IMAGE_KEYS = ("image", "file_name", "image_path", "path", "filepath")
TEXT_KEYS = ("text", "caption", "captions")


def is_coco(path: Path) -> bool:
    """A COCO captions annotations file: a JSON object with `images` and `annotations` lists."""
    if path.suffix != ".json" or not path.is_file():
        return False
    try:
        with path.open() as f:
            head = f.read(4096)
    except OSError:
        return False
    return '"images"' in head or '"annotations"' in head


def find_coco(folder: Path) -> Path | None:
    """The annotations file of a COCO-style folder (top level or annotations/)."""
    for candidate in sorted([*folder.glob("*.json"), *folder.glob("annotations/*.json")]):
        if is_coco(candidate):
            return candidate
    return None


def _image_root(annotations: Path, image_root: str | None, first: str) -> Path:
    if image_root:
        return Path(image_root)
    for root in (
        annotations.parent,
        annotations.parent / "images",
        annotations.parent.parent,
        annotations.parent.parent / "images",
    ):
        if (root / first).exists():
            return root
    return annotations.parent


def load_coco(annotations: Path, image_root: str | None = None) -> Any:
    """One row per image: `image` (absolute path), `text` (all its captions), `image_id`."""
    try:
        doc = json.loads(annotations.read_text())
        images, anns = doc["images"], doc["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{annotations} is not a COCO captions file (needs `images` and `annotations`): {e}"
        ) from e
    captions: dict[Any, list[str]] = defaultdict(list)
    for i, a in enumerate(anns):
        if not isinstance(a, dict) or "image_id" not in a:
            raise DataError(f"{annotations}: annotations[{i}] has no image_id")
        captions[a["image_id"]].append(a.get("caption"))
    root = _image_root(annotations, image_root, images[0]["file_name"] if images else "")
    rows = {"image": [], "text": [], "image_id": []}
    for i, im in enumerate(images):
        if not isinstance(im, dict) or "file_name" not in im or "id" not in im:
            raise DataError(f"{annotations}: images[{i}] needs file_name and id")
        rows["image"].append(str((root / im["file_name"]).resolve()))
        rows["text"].append(captions.get(im["id"], []))
        rows["image_id"].append(str(im["id"]))
    return _dataset(rows)


def load_manifest(path: Path) -> Any:
    """A .jsonl or .csv with an image path (relative to the manifest) and a caption, or question/answer(s)."""
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            with path.open(newline="") as f:
                records = list(csv.DictReader(f))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read manifest {path}: {e}") from e
    if not records:
        raise DataError(f"manifest {path} has no records")
    keys = set(records[0])
    image_key = next((k for k in IMAGE_KEYS if k in keys), None)
    if image_key is None:
        raise DataError(
            f"manifest {path}: no image column (one of {', '.join(IMAGE_KEYS)}); it has {sorted(keys)}"
        )
    rows: dict[str, list] = {"image": []}
    text_key = next((k for k in TEXT_KEYS if k in keys), None)
    for r in records:
        rows["image"].append(str((path.parent / str(r.get(image_key, ""))).resolve()))
    if text_key:
        rows["text"] = [r.get(text_key) for r in records]
    for extra in ("question", "answer", "answers", "id"):
        if extra in keys:
            rows[extra] = [r.get(extra) for r in records]
    return _dataset(rows)


CONVERSATION_KEYS = ("messages", "conversations")


def is_conversations(path: Path) -> bool:
    """A conversation file: a .json list or a .jsonl of records with `messages` or `conversations` (told from
    the head of the file: a LLaVA file can be a gigabyte)."""
    if path.suffix not in (".json", ".jsonl") or not path.is_file():
        return False
    try:
        with path.open() as f:
            head = f.read(4096).lstrip()
    except (OSError, UnicodeDecodeError):
        return False
    opens = head.startswith("[") if path.suffix == ".json" else head.startswith("{")
    return opens and any(f'"{k}"' in head for k in CONVERSATION_KEYS)


def read_records(path: Path) -> list[Any]:
    """The records of a .json list or a .jsonl file; an error naming the line that does not parse."""
    try:
        text = path.read_text()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records")
        return records
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise DataError(f"{path}, line {n}: not valid JSON ({e})") from e
    return records


def layout_of(record: Any) -> str:
    """Which conversation layout a record is written in (for `vlmtune data check`)."""
    if not isinstance(record, dict):
        return "unknown"
    messages = [m for m in record.get("messages", record.get("conversations")) or [] if isinstance(m, dict)]
    if "conversations" in record or any("from" in m for m in messages):
        return "LLaVA (conversations / from / value)"
    parts = [p for m in messages for p in _parts(m)]
    if any(p.get("type") == "image_url" for p in parts):
        return "OpenAI chat (image_url parts)"
    if parts:
        return "typed messages (TRL: content parts + images)"
    return "ShareGPT messages (role / content + images)"


def _parts(message: dict) -> list[dict]:
    content = message.get("content")
    return [p for p in content if isinstance(p, dict)] if isinstance(content, list) else []


def load_conversations(path: Path, image_root: str | None = None) -> Any:
    """`messages` (JSON text) and `images` (absolute paths, data URIs as they are) of each record; a record
    without messages keeps its place, as one more bad record for the checks to name."""
    root = Path(image_root) if image_root else path.parent
    rows: dict[str, list] = {"messages": [], "images": []}
    for r in read_records(path):
        r = r if isinstance(r, dict) else {}
        messages = next((r[k] for k in CONVERSATION_KEYS if k in r), None)
        images = r.get("images", r.get("image"))
        images = [] if images is None else [images] if isinstance(images, str) else list(images)
        messages = [_resolved_parts(m, root) for m in messages] if isinstance(messages, list) else messages
        rows["messages"].append(json.dumps(messages))
        rows["images"].append([_resolved(i, root) for i in images])
    files = [i for images in rows["images"] for i in images if isinstance(i, str)]
    return _dataset(rows, files)


def _resolved(image: Any, root: Path) -> Any:
    if isinstance(image, str) and not image.startswith(("data:", "http://", "https://")):
        return str((root / image).resolve())
    return image


def _resolved_parts(message: Any, root: Path) -> Any:
    """A message with the image paths in its content parts made absolute (data URIs stay as they are)."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    parts = []
    for p in message["content"]:
        if isinstance(p, dict) and p.get("type") == "image_url":
            url = p.get("image_url")
            if isinstance(url, dict) and isinstance(url.get("url"), str):
                p = {**p, "image_url": {**url, "url": _resolved(url["url"], root)}}
            elif isinstance(url, str):
                p = {**p, "image_url": _resolved(url, root)}
        elif isinstance(p, dict) and p.get("type") == "image" and isinstance(p.get("image"), str):
            p = {**p, "image": _resolved(p["image"], root)}
        parts.append(p)
    return {**message, "content": parts}


def _dataset(rows: dict[str, list], files: list[str] | None = None) -> Any:
    """`rows` as a `datasets.Dataset` whose fingerprint follows its content, each image file's size and time
    (`files`, default the `image` column) included, as `datasets` does for the files it reads itself: the same files give the same fingerprint in
    every run (kept image features are found again), and any change gives another."""
    import datasets

    rows = _typed(rows)
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode())
    for image in rows["image"] if files is None else files:
        try:
            stat = os.stat(image)
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns};".encode())
        except OSError:
            digest.update(b"missing;")
    table = datasets.Dataset.from_dict(rows)
    return datasets.Dataset(table.data, info=table.info, fingerprint=digest.hexdigest()[:16])


def load_metadata_folder(folder: Path) -> Any | None:
    """An image folder's metadata.jsonl files, read as `datasets`' imagefolder reads them (each `file_name`
    relative to its own file becomes the `image` column; a top folder named train/validation/test is a split),
    when some column gives values of more than one JSON type (a caption that is a number): `datasets`' JSON
    reader stops at the first such row, naming no record, while here it becomes one more bad record
    (`_typed`). None when every column is of one type: `datasets` reads the folder itself."""
    import datasets

    splits: dict[str, dict[str, list]] = {}
    for meta in sorted(folder.rglob("metadata.jsonl")):
        top = meta.relative_to(folder).parts[0]
        split = top if top in ("train", "validation", "test") and top != meta.name else "train"
        records = splits.setdefault(split, {"image": [], "_record": []})
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{meta}, line {n}: not JSON ({e})") from e
            if not isinstance(record, dict) or "file_name" not in record:
                raise DataError(f"{meta}, line {n}: expected an object with a file_name")
            records["image"].append(str((meta.parent / str(record.pop("file_name"))).resolve()))
            records["_record"].append(record)
    types: dict[str, Counter] = defaultdict(Counter)
    for rows in splits.values():
        records = rows.pop("_record")
        for key in sorted({k for r in records for k in r}):
            rows[key] = [r.get(key) for r in records]
            types[key] += _types(rows[key])
    if all(len(t) < 2 for t in types.values()):
        return None
    return datasets.DatasetDict({split: _dataset(rows) for split, rows in splits.items()})


def _types(values: list) -> Counter:
    return Counter(type(v) for v in values if v is not None)


def _typed(rows: dict[str, list]) -> dict[str, list]:
    """`rows` with every column of one type, as Arrow needs: a value of another type than the column's usual
    one (a caption that is a number) becomes null, and a `_problems` column names it for the record check."""
    problems: list[list[dict[str, str]]] = [[] for _ in next(iter(rows.values()))]
    for key, values in rows.items():
        types = _types(values)
        if key == "image" or len(types) < 2:
            continue
        usual = types.most_common(1)[0][0]
        for i, v in enumerate(values):
            if v is not None and type(v) is not usual:
                why = f"expected {_kind(usual)}, got {v!r} ({_kind(type(v))})"
                problems[i].append({"field": key, "why": why})
                values[i] = None
    return rows | {"_problems": problems} if any(problems) else rows


def _kind(t: type) -> str:
    return {
        str: "text",
        int: "a number",
        float: "a number",
        bool: "true/false",
        list: "a list",
        dict: "an object",
    }.get(t, t.__name__)
