"""Bad records found before training, all of them in one report; `vlmtune data check` for a summary.

A bad record is one training would trip over: a missing or unreadable image file, a truncated image, one over
the pixel limit, an empty or non-string caption, a duplicated id. Training refuses to start and names every
one (row, field, file, why), or with --skip-bad trains on the rest and lists them in RUN_DIR/skipped.jsonl.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from tqdm.auto import tqdm

from ..config import DataCheckConfig
from ..errors import DataError
from .conversations import Conversation, parse
from .examples import Prompting, target_problem, targets_of
from .images import as_image, file_of
from .sources import is_conversation, iter_column, load_dict, pick_split, required_columns


@dataclass
class BadRecord:
    row: int
    field: str
    why: str
    file: str | None = None

    def __str__(self) -> str:
        where = f" ({self.file})" if self.file else ""
        return f"row {self.row}, {self.field}{where}: {self.why}"


def raw_images(dataset: Any, column: str) -> Any:
    """The image column without decoding (so a broken image is a finding, not a crash): one image a row, or
    a list of them (TRL's `images`)."""
    import datasets

    feature = getattr(dataset, "features", None)
    feature = feature.get(column) if feature else None
    if isinstance(feature, datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    elif isinstance(getattr(feature, "feature", None), datasets.Image):
        dataset = dataset.cast_column(column, type(feature)(datasets.Image(decode=False)))  # List or Sequence
    return dataset


def find_bad_records(
    dataset: Any, image_column: str, text_column: str, *, progress: bool = True, sizes: list | None = None
) -> list[BadRecord]:
    """Every bad record of `dataset`, decoding each image as training would. `sizes` collects (w, h, mode)."""
    bad: list[BadRecord] = []
    bar = tqdm(total=len(dataset), desc="checking records", unit="record", disable=not progress)
    for i, value in enumerate(iter_column(raw_images(dataset, image_column), image_column)):
        bar.update(1)
        problem = _image_problem(value, i, image_column, sizes)
        if problem is not None:
            bad.append(problem)
    bar.close()
    # What the loader itself found wrong while reading (a caption of the wrong type, say), by row and field.
    found: dict[tuple[int, str], str] = {}
    if "_problems" in (getattr(dataset, "column_names", None) or []):
        for i, problems in enumerate(iter_column(dataset, "_problems")):
            for p in problems:
                found[i, p["field"]] = p["why"]
                bad.append(BadRecord(i, p["field"], p["why"]))
    texts = iter_column(dataset, text_column)
    for i, value in enumerate(texts):
        if (i, text_column) in found:
            continue
        problem = next(filter(None, map(target_problem, targets_of(value))), None)
        if problem is not None:
            bad.append(BadRecord(i, text_column, problem))
    for column in ("id", "image_id"):
        if hasattr(dataset, "column_names") and column in dataset.column_names:
            ids = dataset[column]
            seen: dict[Any, int] = {}
            for i, v in enumerate(ids):
                if v in seen:
                    bad.append(BadRecord(i, column, f"duplicated id {v!r} (first at row {seen[v]})"))
                seen.setdefault(v, i)
    return sorted(bad, key=lambda b: (b.row, b.field))


def find_bad_conversations(
    dataset: Any,
    messages_column: str,
    images_column: str,
    *,
    max_images: int | None = 1,
    example_problem: Callable[[Conversation], str | None] | None = None,
    progress: bool = True,
    sizes: list | None = None,
    good: list | None = None,
) -> list[BadRecord]:
    """Every bad record of a conversation split, all at once: messages that do not parse (unknown roles, turns
    that do not alternate, an empty reply, image markers that do not match the images), no image or more
    than the family reads (`max_images`, None: any number), an image that does not decode, and what
    `example_problem` finds in the examples a conversation gives (one --max-length would cut, say). `sizes`
    collects (w, h, mode) of every image, `good` the conversations that pass."""
    bad: list[BadRecord] = []
    has_images = images_column in (dataset.column_names or [])
    messages = iter_column(dataset, messages_column)
    images = iter_column(raw_images(dataset, images_column), images_column) if has_images else None
    for i, value in enumerate(
        tqdm(messages, total=len(dataset), desc="checking conversations", disable=not progress)
    ):
        try:
            conversation = parse(value, next(images) if images is not None else None)
        except DataError as e:
            bad.append(BadRecord(i, messages_column, str(e)))
            continue
        n = len(conversation.images)
        if n == 0 or (max_images is not None and n > max_images):
            reads = f"at most {max_images}" if max_images is not None else "one or more"
            bad.append(BadRecord(i, images_column, f"{n} images; this model reads {reads} per conversation"))
            continue
        several = n > 1
        broken = [
            _image_problem(cell, i, f"{images_column} [{k}]" if several else images_column, sizes)
            for k, cell in enumerate(conversation.images)
        ]
        if any(broken):
            bad.extend(b for b in broken if b is not None)
            continue
        problem = example_problem(conversation) if example_problem is not None else None
        if problem is not None:
            bad.append(BadRecord(i, messages_column, problem))
        elif good is not None:
            good.append(conversation)
    return bad


def bad_conversations(dataset: Any, cfg: Any, family: Any, processor: Any, **kwargs: Any) -> list[BadRecord]:
    """`find_bad_conversations` under a family's rules: the images it reads, and `example_rules`."""
    return find_bad_conversations(
        dataset,
        cfg.messages_column,
        cfg.images_column,
        max_images=family.max_images,
        example_problem=example_rules(cfg, family, processor),
        **kwargs,
    )


def example_rules(cfg: Any, family: Any, processor: Any) -> Callable[[Conversation], str | None]:
    """What must hold for each example a conversation gives: it shows an image by its reply (a family that
    trains each reply apart makes one example per reply), and it fits --max-length: an example over it is
    refused, never cut (a cut would drop the reply's end, or the image tokens of a long dialogue)."""
    prompting = Prompting.of(cfg, family)
    per_turn = not family.trains_history and not getattr(cfg, "train_on_last_turn_only", False)

    def problem(conversation: Conversation) -> str | None:
        for d in prompting.dialogues(conversation, per_turn=per_turn):
            if not sum(d.turn_images):
                return (
                    f"the reply of turn {len(d.history) + 1} comes before the first image; this model trains "
                    "each reply apart: put an image in the first user turn"
                )
            n = family.text_tokens(processor, d.prompt, d.target, d.history, d.turn_images)
            if n > cfg.max_length:
                return (
                    f"{n} text tokens, over --max-length {cfg.max_length}: it would be cut; shorten the "
                    "conversation or raise --max-length"
                )
        return None

    return problem


def _image_problem(cell: Any, i: int, field: str, sizes: list | None) -> BadRecord | None:
    """The record's image decoded as training decodes it: None, or what is wrong (without the file name the
    error starts with: the record names the file apart). `sizes` collects (w, h, mode)."""
    try:
        image = as_image(cell, f"row {i}")
    except DataError as e:
        why, file = str(e), file_of(cell)
        why = why[len(f"image {file} ") :] if file and why.startswith(f"image {file} ") else why
        return BadRecord(i, field, why, file)
    if sizes is not None:
        sizes.append((image.width, image.height, image.info.get("source_mode", image.mode)))
    return None


def bad_report(source: str, split: str, bad: list[BadRecord]) -> str:
    lines = [f"{len(bad)} bad record(s) in {source} (split {split!r}):"] + [f"  - {b}" for b in bad]
    lines.append(
        "Fix them, or pass --skip-bad to train on the rest (they are listed in RUN_DIR/skipped.jsonl)."
    )
    return "\n".join(lines)


def bad_as_dicts(bad: list[BadRecord]) -> list[dict]:
    return [asdict(b) for b in bad]


def _check_conversations(
    cfg: DataCheckConfig, ds: Any, name: str, family: Any, processor: Any
) -> dict[str, Any]:
    """`data check` of a conversation split: its layout, turns, tokens as training counts them, images, and
    every bad record."""
    from .formats import layout_of

    sizes: list = []
    good: list = []
    bad = bad_conversations(ds, cfg, family, processor, sizes=sizes, good=good)
    prompting = Prompting.of(cfg, family)
    per_turn = not family.trains_history
    lengths = [
        family.text_tokens(processor, d.prompt, d.target, d.history, d.turn_images)
        for c in good
        for d in prompting.dialogues(c, per_turn=per_turn)
    ]
    first = ds[0][cfg.messages_column] if len(ds) else []
    layout = layout_of({"messages": json.loads(first) if isinstance(first, str) else first})
    s = {
        "layout": layout,
        "records": len(ds),
        "conversations": len(good),
        "replies_per_conversation": _stats([len(c.exchanges()) for c in good]),
        "images_per_conversation": _stats([len(c.images) for c in good]),
        "tokens": _stats(lengths),
        "width": _stats([w for w, _, _ in sizes]),
        "height": _stats([h for _, h, _ in sizes]),
        "modes": dict(Counter(m for _, _, m in sizes)),
        "bad": bad_as_dicts(bad),
    }
    tokens = _image_tokens(family, processor, sizes)
    if tokens is not None:
        s["image_tokens"] = tokens
    print(f"\nsplit {name!r}: {s['records']} conversations ({layout})")
    for key in ("replies_per_conversation", "images_per_conversation", "tokens", "width", "height"):
        print(f"  {key.replace('_', ' ')}: {s[key]}")
    print(f"  image modes: {s['modes']}")
    if tokens is not None:
        print(f"  image tokens per image: {tokens} ({_resized(family, processor)})")
    print(f"  bad records: {len(bad)}" + "".join(f"\n    - {b}" for b in bad))
    return s


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    return f"min {min(values):g}, median {statistics.median(values):g}, max {max(values):g}"


def _image_tokens(family: Any, processor: Any, sizes: list) -> str | None:
    """Image tokens per image, as the family's processor resizes them (None where the count never varies)."""
    counts: dict[tuple[int, int], int | None] = {}
    for w, h, _ in sizes:
        if (w, h) not in counts:
            counts[(w, h)] = family.image_tokens(processor, w, h)
    per_image = [counts[(w, h)] for w, h, _ in sizes]
    if not per_image or per_image[0] is None:
        return None
    return _stats(per_image)


def _resized(family: Any, processor: Any) -> str:
    """How the processor sizes images, as `data check` reports it beside their tokens."""
    if not family.dynamic_resolution:
        return "as the processor tiles them"
    fewest, most = family.pixel_limits(processor)
    return f"images resized to {fewest}..{most} pixels: --min-pixels / --max-pixels"


def check(cfg: DataCheckConfig) -> dict[str, Any]:
    """`vlmtune data check`: load every record as training would; print a summary and every bad record."""
    from ..modeling import load_processor, resolve_model
    from .sources import detect

    kind, _ = detect(cfg.data)
    loaded = load_dict(cfg.data, cfg.image_root)
    from ..families import family_for
    from ..modeling import load_config

    processor = load_processor(resolve_model(cfg.model))
    family = family_for(load_config(cfg.model))
    family.limit_pixels(processor, cfg.min_pixels, cfg.max_pixels)  # as training will
    print(f"{cfg.data}: detected {kind}; splits: {', '.join(f'{k} ({len(v)})' for k, v in loaded.items())}")
    summary: dict[str, Any] = {"format": kind, "splits": {}}
    for name in [cfg.split] if cfg.split else list(loaded):
        ds = pick_split(loaded, cfg.data, name, required_columns(cfg))
        if is_conversation(ds.column_names, cfg):
            summary["splits"][name] = _check_conversations(cfg, ds, name, family, processor)
            continue
        sizes: list = []
        bad = find_bad_records(ds, cfg.image_column, cfg.text_column, sizes=sizes)
        captions = [t for v in ds[cfg.text_column] for t in targets_of(v) if isinstance(t, str) and t.strip()]
        per_image = [len(targets_of(v)) for v in ds[cfg.text_column]]
        # As training counts them: the family's prompt, special tokens and end token included.
        lengths = [family.text_tokens(processor, family.caption_prompt, t) for t in captions]
        s = {
            "records": len(ds),
            "captions": len(captions),
            "captions_per_image": _stats(per_image),
            "caption_tokens": _stats(lengths),
            "truncated_at_max_length": sum(n > cfg.max_length for n in lengths),
            "width": _stats([w for w, _, _ in sizes]),
            "height": _stats([h for _, h, _ in sizes]),
            "modes": dict(Counter(m for _, _, m in sizes)),
            "bad": bad_as_dicts(bad),
        }
        tokens = _image_tokens(family, processor, sizes)
        if tokens is not None:
            s["image_tokens"] = tokens
        summary["splits"][name] = s
        print(f"\nsplit {name!r}: {s['records']} records, {s['captions']} captions")
        for key in ("captions_per_image", "caption_tokens", "width", "height"):
            print(f"  {key.replace('_', ' ')}: {s[key]}")
        print(f"  over --max-length {cfg.max_length} tokens (would be cut): {s['truncated_at_max_length']}")
        print(f"  image modes: {s['modes']}")
        if tokens is not None:
            print(f"  image tokens per image: {tokens} ({_resized(family, processor)})")
        print(f"  bad records: {len(bad)}" + "".join(f"\n    - {b}" for b in bad))
    print(
        f"\n(caption lengths counted as {family.name} training counts them, with the tokenizer of {cfg.model})"
    )
    return summary
