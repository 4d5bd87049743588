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
# An image and its (user, assistant) exchanges; or, for several images, one list of images per exchange (the
# images its user turn shows, maybe none).
Dialogue = tuple[Image.Image | Sequence[Sequence[Image.Image]], Sequence[tuple[str, str]]]


def per_turn(images: Image.Image | Sequence[Sequence[Image.Image]], turns: int) -> list[list[Image.Image]]:
    """A dialogue's images as one list per exchange: a lone image goes with the first."""
    if isinstance(images, Image.Image):
        return [[images]] + [[] for _ in range(turns - 1)]
    return [list(shown) for shown in images]


def write(layout: str, dialogues: Sequence[Dialogue], out: str | Path, system: str = "") -> Path:
    """`dialogues` in `layout` under the folder `out`; returns what `--data` takes (a file or the folder)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "trl":
        return _trl(dialogues, out, system)
    (out / "images").mkdir(exist_ok=True)
    records = []
    for k, (images, exchanges) in enumerate(dialogues):
        names = []
        for j, shown in enumerate(per_turn(images, len(exchanges))):
            names.append([f"images/{k}-{j}-{n}.png" for n in range(len(shown))])
            for image, name in zip(shown, names[-1], strict=True):
                image.save(out / name)
        records.append(WRITERS[layout](k, names, exchanges, system))
    if layout == "llava":
        path = out / "data.json"
        path.write_text(json.dumps(records, indent=1))
    else:
        path = out / ("chat.jsonl" if layout == "openai" else "data.jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _system(system: str, role_key: str = "role", text_key: str = "content") -> list[dict[str, Any]]:
    return [{role_key: "system", text_key: system}] if system else []


Names = Sequence[Sequence[str]]  # the image files each exchange's user turn shows


def _llava(k: int, names: Names, exchanges: Sequence[tuple[str, str]], system: str) -> dict[str, Any]:
    turns = _system(system, "from", "value")
    for shown, (user, reply) in zip(names, exchanges, strict=True):
        turns += [
            {"from": "human", "value": "<image>\n" * len(shown) + user},
            {"from": "gpt", "value": reply},
        ]
    files = [name for shown in names for name in shown]
    return {"id": str(k), "image": files[0] if len(files) == 1 else files, "conversations": turns}


def _sharegpt(k: int, names: Names, exchanges: Sequence[tuple[str, str]], system: str) -> dict[str, Any]:
    messages = _system(system)
    for shown, (user, reply) in zip(names, exchanges, strict=True):
        messages += [
            {"role": "user", "content": "<image>" * len(shown) + user},
            {"role": "assistant", "content": reply},
        ]
    return {"messages": messages, "images": [name for shown in names for name in shown]}


def _openai(k: int, names: Names, exchanges: Sequence[tuple[str, str]], system: str) -> dict[str, Any]:
    messages = _system(system)
    for shown, (user, reply) in zip(names, exchanges, strict=True):
        parts = [{"type": "image_url", "image_url": {"url": name}} for name in shown]
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
    for images, exchanges in dialogues:
        messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        shown = per_turn(images, len(exchanges))
        for held, (user, reply) in zip(shown, exchanges, strict=True):
            image_parts = [{"type": "image", "text": None} for _ in held]
            messages += [
                {"role": "user", "content": image_parts + [{"type": "text", "text": user}]},
                {"role": "assistant", "content": [{"type": "text", "text": reply}]},
            ]
        rows["images"].append([image for held in shown for image in held])
        rows["messages"].append(messages)
    Dataset.from_dict(rows, features=features).save_to_disk(str(out / "trl"))
    return out / "trl"
