"""The same conversations written in each layout vlmtune reads: for the tests (every layout must give the same
token ids and labels), for trying a layout out, and as the reference of what each looks like.

    llava     data.json   [{"id", "image": "images/0.png", "conversations": [{"from": "human", "value":
                          "<image>\nq"}, {"from": "gpt", "value": "a"}, ...]}]
    sharegpt  data.jsonl  {"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant",
                          "content": "a"}, ...], "images": ["images/0.png"]}
    trl       a `datasets` directory: `images` (a list of images), `messages` with typed content
                          ([{"type": "image"}, {"type": "text", "text": "q"}])
    openai    chat.jsonl  {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url":
                          {"url": "images/0.png"}}, {"type": "text", "text": "q"}]}, {"role": "assistant",
                          "content": "a"}]}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

LAYOUTS = ("llava", "sharegpt", "trl", "openai")
Dialogue = tuple[Image.Image, Sequence[tuple[str, str]]]  # an image and its (user, assistant) exchanges


def write(layout: str, dialogues: Sequence[Dialogue], out: str | Path, system: str = "") -> Path:
    """`dialogues` in `layout` under the folder `out`; returns what `--data` takes (a file or the folder)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "trl":
        return _trl(dialogues, out, system)
    (out / "images").mkdir(exist_ok=True)
    records = []
    for k, (image, exchanges) in enumerate(dialogues):
        name = f"images/{k}.png"
        image.save(out / name)
        records.append(WRITERS[layout](k, name, exchanges, system))
    if layout == "llava":
        path = out / "data.json"
        path.write_text(json.dumps(records, indent=1))
    else:
        path = out / ("chat.jsonl" if layout == "openai" else "data.jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _system(system: str, role_key: str = "role", text_key: str = "content") -> list[dict[str, Any]]:
    return [{role_key: "system", text_key: system}] if system else []


def _llava(k: int, image: str, exchanges: Sequence[tuple[str, str]], system: str) -> dict[str, Any]:
    turns = _system(system, "from", "value")
    for j, (user, reply) in enumerate(exchanges):
        turns += [
            {"from": "human", "value": ("<image>\n" if j == 0 else "") + user},
            {"from": "gpt", "value": reply},
        ]
    return {"id": str(k), "image": image, "conversations": turns}


def _sharegpt(k: int, image: str, exchanges: Sequence[tuple[str, str]], system: str) -> dict[str, Any]:
    messages = _system(system)
    for j, (user, reply) in enumerate(exchanges):
        messages += [
            {"role": "user", "content": ("<image>" if j == 0 else "") + user},
            {"role": "assistant", "content": reply},
        ]
    return {"messages": messages, "images": [image]}


def _openai(k: int, image: str, exchanges: Sequence[tuple[str, str]], system: str) -> dict[str, Any]:
    messages = _system(system)
    for j, (user, reply) in enumerate(exchanges):
        parts = [{"type": "image_url", "image_url": {"url": image}}] if j == 0 else []
        messages += [
            {"role": "user", "content": parts + [{"type": "text", "text": user}]},
            {"role": "assistant", "content": reply},
        ]
    return {"messages": messages}


WRITERS = {"llava": _llava, "sharegpt": _sharegpt, "openai": _openai}


def _trl(dialogues: Sequence[Dialogue], out: Path, system: str) -> Path:
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature
    from datasets import Sequence as Seq

    part = {"type": Value("string"), "text": Value("string")}
    features = Features(
        {
            "images": Seq(ImageFeature()),
            "messages": [{"role": Value("string"), "content": [part]}],
        }
    )
    rows: dict[str, list] = {"images": [], "messages": []}
    for image, exchanges in dialogues:
        messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        for j, (user, reply) in enumerate(exchanges):
            image_part = [{"type": "image", "text": None}] if j == 0 else []
            messages += [
                {"role": "user", "content": image_part + [{"type": "text", "text": user}]},
                {"role": "assistant", "content": [{"type": "text", "text": reply}]},
            ]
        rows["images"].append([image])
        rows["messages"].append(messages)
    Dataset.from_dict(rows, features=features).save_to_disk(str(out / "trl"))
    return out / "trl"
