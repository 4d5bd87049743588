"""Procedurally drawn captioning data: shapes (what the tiny base was pretrained on) and football (the demo).

Both generators are pure functions of a seed, so the same call gives the same images and captions on every
machine. The two caption domains share colour words but nothing else, which is what makes the football set a
real fine-tuning task for the tiny base: it has learned to see colours and positions, not players.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..atomic import build_dir

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (250, 140, 20),
    "purple": (140, 50, 180),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "brown": (120, 80, 50),
    "pink": (240, 170, 190),
}
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
SIZE = 128  # pixels; the tiny base's processor resizes to 64


@dataclass(frozen=True)
class Example:
    image: Image.Image
    text: str
    qa: tuple[tuple[str, str], ...] = ()  # (question, answer) pairs about the image, for VQA


def _shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def shapes_example(rng: random.Random) -> Example:
    """One or two coloured shapes on a plain background, e.g. 'a large red circle on the left'."""
    bg = rng.choice(list(BACKGROUNDS))
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[bg])
    draw = ImageDraw.Draw(image)
    sides = sorted(rng.sample(SIDES, k=rng.choice((1, 2))))  # left before right: one caption per scene
    parts, qa = [], [("how many shapes are there?", "one" if len(sides) == 1 else "two")]
    qa.append(("what colour is the background?", bg))
    for side in sides:
        colour, kind, big = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.random() < 0.5
        r = SIZE * (0.22 if big else 0.12)
        cx = SIZE * (0.28 if side == "left" else 0.72) + rng.uniform(-6, 6)
        cy = SIZE * 0.5 + rng.uniform(-20, 20)
        _shape(draw, kind, cx, cy, r, COLOURS[colour])
        parts.append(f"a {'large' if big else 'small'} {colour} {kind} on the {side}")
        qa += [(f"what shape is on the {side}?", kind), (f"what colour is the shape on the {side}?", colour)]
    return Example(image, " and ".join(parts) + f" on a {bg} background", tuple(qa))


JERSEYS = ("red", "blue", "yellow", "white", "orange", "purple", "black")


def _player(draw: ImageDraw.ImageDraw, cx: float, ground: float, jersey, scale: float) -> None:
    s = scale
    skin, shorts = (230, 190, 150), (30, 30, 30)
    draw.line([(cx - 5 * s, ground - 14 * s), (cx - 8 * s, ground)], fill=shorts, width=max(1, int(3 * s)))
    draw.line([(cx + 5 * s, ground - 14 * s), (cx + 8 * s, ground)], fill=shorts, width=max(1, int(3 * s)))
    draw.rectangle((cx - 8 * s, ground - 40 * s, cx + 8 * s, ground - 14 * s), fill=jersey)
    draw.ellipse((cx - 6 * s, ground - 54 * s, cx + 6 * s, ground - 41 * s), fill=skin)


def football_example(rng: random.Random) -> Example:
    """Players in coloured jerseys on a pitch, a ball on one side, sometimes a goal.

    e.g. 'two players in red and blue jerseys with the ball on the left near the goal'.
    """
    image = Image.new("RGB", (SIZE, SIZE), (60, 150, 60))
    draw = ImageDraw.Draw(image)
    for y in range(0, SIZE, 16):  # mown stripes, so the grass is not a flat colour
        draw.rectangle((0, y, SIZE, y + 7), fill=(70, 165, 70))
    draw.line([(0, SIZE * 0.82), (SIZE, SIZE * 0.82)], fill=(240, 240, 240), width=2)
    goal = rng.random() < 0.5
    if goal:
        draw.rectangle((SIZE * 0.3, SIZE * 0.08, SIZE * 0.7, SIZE * 0.32), outline=(250, 250, 250), width=3)
    n = rng.choice((1, 2))
    jerseys = rng.sample(JERSEYS, k=n)
    ball_side = rng.choice(SIDES)
    slots = [0.5] if n == 1 else [0.38, 0.62]
    for jersey, x in zip(jerseys, slots, strict=True):
        _player(draw, SIZE * x + rng.uniform(-4, 4), SIZE * 0.8 + rng.uniform(-3, 3), COLOURS[jersey], 1.1)
    bx = SIZE * (0.14 if ball_side == "left" else 0.86)
    by = SIZE * 0.74 + rng.uniform(-4, 4)
    draw.ellipse((bx - 7, by - 7, bx + 7, by + 7), fill=(250, 250, 250), outline=(0, 0, 0), width=2)
    who = (
        f"a player in {_article(jerseys[0])} {jerseys[0]} jersey"
        if n == 1
        else f"two players in {jerseys[0]} and {jerseys[1]} jerseys"
    )
    text = f"{who} with the ball on the {ball_side}" + (" near the goal" if goal else "")
    return Example(image, text)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


GENERATORS = {"shapes": shapes_example, "football": football_example}


def examples(kind: str, n: int, seed: int) -> Iterator[Example]:
    """`n` examples of `kind` ('shapes' or 'football'), the same for the same seed."""
    rng = random.Random(f"{kind}-{seed}")
    make = GENERATORS[kind]
    for _ in range(n):
        yield make(rng)


DEMO_SPLITS = {"train": (240, 0), "validation": (24, 1), "test": (24, 2)}


def write_football_dataset(out: str | Path, splits: dict[str, tuple[int, int]] = DEMO_SPLITS) -> Path:
    """Write the demo dataset as a `datasets` DatasetDict (save_to_disk) with columns `image` and `text`.

    The same layout as `ybelkada/football-dataset` once downloaded, so the demo exercises the real loading path.
    Built beside `out` and swapped in, so an interrupted run never leaves half a dataset behind.
    """
    from datasets import Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature

    out = Path(out)
    features = Features({"image": ImageFeature(), "text": Value("string")})
    parts = {}
    for name, (n, seed) in splits.items():
        rows = list(examples("football", n, seed))
        parts[name] = Dataset.from_dict(
            {"image": [r.image for r in rows], "text": [r.text for r in rows]}, features=features
        )
    return build_dir(out, lambda tmp: DatasetDict(parts).save_to_disk(str(tmp)))


def dialogues(n: int, seed: int) -> Iterator[tuple[Image.Image, list[tuple[str, str]]]]:
    """`n` shapes scenes, each with a two-exchange dialogue: its caption (an empty user turn: "describe it"),
    then a question whose answer the image (and the caption before it) holds."""
    rng = random.Random(f"dialogue-{seed}")
    for _ in range(n):
        example = shapes_example(rng)
        question, answer = rng.choice(example.qa)
        yield example.image, [("", example.text), (question, answer)]
