"""Conversations: the one form every dialogue layout becomes, and the checks they all get.

A record of any layout (LLaVA's `conversations`, ShareGPT / LLaMA-Factory `messages` + `images`, TRL's typed
content, OpenAI chat with `image_url` parts) is read by `parse` into a `Conversation`: turns with roles
(system, user, assistant) whose text has its image markers taken out, and the images in the order the turns
hold them. A caption is the one-exchange case (an image, an empty user turn, the caption).

The layouts differ only in spelling, so one reader takes them all:

    role:     "role" or "from"; user / human, assistant / gpt / bot / model, system
    text:     "content" or "value": a string (images marked `<image>`), or typed parts: {"type": "text",
              "text"}, {"type": "image"} (the next of the record's images), {"type": "image", "image": PATH},
              {"type": "image_url", "image_url": {"url": PATH or data URI}}
    images:   the record's `images` (a list) or `image` (one), unless the parts carry them
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import DataError

IMAGE_MARKER = "<image>"
ROLES = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for it
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}


@dataclass(frozen=True)
class Turn:
    role: str  # "system", "user" or "assistant"
    text: str  # image markers taken out
    images: int = 0  # how many of the conversation's images this turn holds


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    images: tuple[Any, ...]  # image cells (paths, data URIs, {"bytes"/"path"}, PIL images), in turn order

    @property
    def system(self) -> str:
        return " ".join(t.text for t in self.turns if t.role == "system")

    def exchanges(self) -> list[tuple[str, str]]:
        """(user text, assistant reply) in order; the system turn is apart (`system`)."""
        talk = [t for t in self.turns if t.role != "system"]
        return [(talk[k].text, talk[k + 1].text) for k in range(0, len(talk) - 1, 2)]

    def image_counts(self) -> tuple[int, ...]:
        """How many images each user turn holds, in order (a system turn's go with the first user turn)."""
        users = [t.images for t in self.turns if t.role == "user"]
        system = sum(t.images for t in self.turns if t.role == "system")
        return (users[0] + system, *users[1:]) if users else ()


def parse(messages: Any, images: Any = None, *, training: bool = True) -> Conversation:
    """`messages` (a list, or its JSON text) and the record's images as a Conversation; a DataError that says
    what is wrong otherwise. With `training`, the turns must alternate user / assistant after an optional
    system turn and end with a non-empty assistant turn (a history to answer from ends with a user turn)."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise DataError(f"messages are not JSON: {e}") from None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"expected a non-empty list of messages, got {type(messages).__name__}")
    given = [] if images is None else [images] if isinstance(images, (str, dict)) else list(images)
    turns, from_parts, markers = [], [], 0
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"message {k}: expected an object with a role and content")
        raw_role = message.get("role", message.get("from"))
        role = ROLES.get(str(raw_role).lower())
        if role is None:
            raise DataError(
                f"message {k}: unknown role {raw_role!r} (expected one of {', '.join(sorted(ROLES))})"
            )
        text, held, marked, urls = _content(message.get("content", message.get("value")), k)
        markers += marked
        from_parts += urls
        turns.append(Turn(role, text, held))
    if from_parts and given:
        raise DataError("images are given both in the messages' parts and beside them; give them once")
    cells = from_parts or given
    if markers and markers != len(cells):
        raise DataError(
            f"{markers} image marker(s) ({IMAGE_MARKER} or image parts) but {len(cells)} image(s) given"
        )
    if not markers and cells:  # no marker: the images go with the first user turn, as LLaVA places them
        first = next((i for i, t in enumerate(turns) if t.role == "user"), 0)
        turns[first] = Turn(turns[first].role, turns[first].text, len(cells))
    _check_order(turns, training)
    held = next((k for k, t in enumerate(turns) if t.role == "assistant" and t.images), None)
    if held is not None:
        raise DataError(f"message {held}: an image in an assistant turn; images go in user turns")
    return Conversation(tuple(turns), tuple(cells))


def _content(content: Any, k: int) -> tuple[str, int, int, list[Any]]:
    """(text, images held, image markers, images carried in the parts) of one message's content."""
    if content is None:
        content = ""
    if isinstance(content, str):
        marked = content.count(IMAGE_MARKER)
        return content.replace(IMAGE_MARKER, " ").strip(), marked, marked, []
    if not isinstance(content, list):
        raise DataError(f"message {k}: content must be text or a list of parts, got {type(content).__name__}")
    texts, held, urls = [], 0, []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind in ("image", "image_url"):
            held += 1
            url = part.get("image_url") if kind == "image_url" else part.get("image")
            url = url.get("url") if isinstance(url, dict) else url
            if url is not None:
                urls.append(url)
        else:
            raise DataError(f"message {k}: unknown content part {part!r} (expected text, image or image_url)")
    text = " ".join(texts)
    marked = text.count(IMAGE_MARKER)  # a marker inside a text part counts as an image too
    return text.replace(IMAGE_MARKER, " ").strip(), held + marked, held + marked, urls


def _check_order(turns: list[Turn], training: bool) -> None:
    talk = turns[1:] if turns and turns[0].role == "system" else turns
    for i, t in enumerate(talk):
        if t.role == "system":
            raise DataError(f"turn {i + len(turns) - len(talk)}: a system turn may only come first")
        want = "user" if i % 2 == 0 else "assistant"
        if t.role != want:
            raise DataError(
                f"turn {i + len(turns) - len(talk)}: roles must alternate user / assistant, got {t.role} "
                f"where {want} belongs"
            )
        if t.role == "assistant" and not t.text and training:  # a model may have said nothing
            raise DataError(f"turn {i + len(turns) - len(talk)}: empty assistant turn")
    if not talk:
        raise DataError("no user or assistant turn")
    if training and talk[-1].role != "assistant":
        raise DataError("the conversation ends with a user turn: nothing to train on")
    if not training and talk[-1].role != "user":
        raise DataError("the conversation ends with an assistant turn: nothing to answer")
