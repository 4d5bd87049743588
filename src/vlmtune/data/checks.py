"""Bad records found before training, all of them in one report; `vlmtune data check` for a summary.

A bad record is one training would trip over: a missing or unreadable image file, a truncated image, one over
the pixel limit, an empty or non-string caption, a duplicated id. Training refuses to start and names every
one (row, field, file, why), or with --skip-bad trains on the rest and lists them in RUN_DIR/skipped.jsonl.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from tqdm.auto import tqdm

from ..config import DataCheckConfig
from ..errors import DataError
from .examples import target_problem, targets_of
from .images import as_image, file_of
from .sources import iter_column, load_dict, pick_split


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
    """The image column without decoding (so a broken image is a finding, not a crash)."""
    import datasets

    if isinstance(getattr(dataset, "features", {}).get(column), datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def find_bad_records(
    dataset: Any, image_column: str, text_column: str, *, progress: bool = True, sizes: list | None = None
) -> list[BadRecord]:
    """Every bad record of `dataset`, decoding each image as training would. `sizes` collects (w, h, mode)."""
    bad: list[BadRecord] = []
    bar = tqdm(total=len(dataset), desc="checking records", unit="record", disable=not progress)
    for i, value in enumerate(iter_column(raw_images(dataset, image_column), image_column)):
        bar.update(1)
        try:
            image = as_image(value, f"row {i}")
            if sizes is not None:
                sizes.append((image.width, image.height, image.info.get("source_mode", image.mode)))
        except DataError as e:
            why, file = str(e), file_of(value)
            if file and why.startswith(f"image {file} "):
                why = why[len(f"image {file} ") :]
            bad.append(BadRecord(i, image_column, why, file))
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


def bad_report(source: str, split: str, bad: list[BadRecord]) -> str:
    lines = [f"{len(bad)} bad record(s) in {source} (split {split!r}):"] + [f"  - {b}" for b in bad]
    lines.append(
        "Fix them, or pass --skip-bad to train on the rest (they are listed in RUN_DIR/skipped.jsonl)."
    )
    return "\n".join(lines)


def bad_as_dicts(bad: list[BadRecord]) -> list[dict]:
    return [asdict(b) for b in bad]


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    return f"min {min(values):g}, median {statistics.median(values):g}, max {max(values):g}"


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
    print(f"{cfg.data}: detected {kind}; splits: {', '.join(f'{k} ({len(v)})' for k, v in loaded.items())}")
    summary: dict[str, Any] = {"format": kind, "splits": {}}
    for name in [cfg.split] if cfg.split else list(loaded):
        ds = pick_split(loaded, cfg.data, name, (cfg.image_column, cfg.text_column))
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
        summary["splits"][name] = s
        print(f"\nsplit {name!r}: {s['records']} records, {s['captions']} captions")
        for key in ("captions_per_image", "caption_tokens", "width", "height"):
            print(f"  {key.replace('_', ' ')}: {s[key]}")
        print(f"  over --max-length {cfg.max_length} tokens (would be cut): {s['truncated_at_max_length']}")
        print(f"  image modes: {s['modes']}")
        print(f"  bad records: {len(bad)}" + "".join(f"\n    - {b}" for b in bad))
    print(
        f"\n(caption lengths counted as {family.name} training counts them, with the tokenizer of {cfg.model})"
    )
    return summary
