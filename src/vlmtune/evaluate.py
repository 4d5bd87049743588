"""`vlmtune evaluate`: caption a split with one or more models, score against every reference, write a report.

OUTPUT/
  metrics.json        per model: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D; tokenizer, library versions, notes
  predictions.jsonl   per image: its row, source file (and COCO image_id), path in the report, references, each
                      model's caption
  coco_results.json   for COCO data: [{"image_id", "caption"}] of the last model, as COCO's tools read it
  report.html         metrics table, loss curve, gallery (report.md: the same as Markdown)
  loss.svg, images/   what the report shows
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import tracking
from .atomic import write_text
from .config import EvaluateConfig
from .data.examples import ConversationExamples
from .data.images import as_image, file_of
from .data.sources import is_conversation, iter_column, load_dict, pick_split, required_columns
from .errors import DataError
from .infer import Captioner
from .metrics import caption_scores, vqa_scores
from .modelcard import write_card
from .report import loss_svg, write_report
from .rundir import METRICS_FILE, read_run, versions

THUMBNAIL = 256  # pixels, longest side, for the gallery


def _record(cfg: EvaluateConfig, out: Path, summary: dict[str, Any]) -> None:
    """OUTPUT/metrics.json; for a run, its model card and its experiment trackers get the scores too."""
    write_text(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    if not cfg.run:
        return
    write_card(cfg.run)  # the card shows RUN_DIR/eval's scores
    numbers = {
        f"eval/{k}" if label == "fine-tuned" else f"eval/{label}/{k}": v
        for label, scores in summary["metrics"].items()
        for k, v in scores.items()
        if isinstance(v, (int, float))
    }
    names = tracking.log_evaluation(Path(cfg.run), numbers)
    if names:
        print(f"scores logged to the run's trackers: {', '.join(names)}")


def _split(cfg: EvaluateConfig) -> tuple[str, Any]:
    loaded = load_dict(cfg.data)
    name = cfg.split or next((s for s in ("validation", "test") if s in loaded), next(iter(loaded)))
    ds = pick_split(loaded, cfg.data, name, required_columns(cfg))
    if cfg.limit:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    return name, ds


def _references(value: Any, row: int) -> list[str]:
    refs = [value] if isinstance(value, str) else list(value or [])
    refs = [r for r in refs if isinstance(r, str) and r.strip()]
    if not refs:
        raise DataError(f"row {row}: no reference caption (got {value!r})")
    return refs


def _models(cfg: EvaluateConfig) -> list[tuple[str, dict[str, str]]]:
    """(label, Captioner.load kwargs) for the main model and each --compare entry."""
    if (cfg.run is None) == (cfg.model is None):
        raise ValueError("give exactly one of --run RUN_DIR or --model MODEL")
    main = ("fine-tuned" if cfg.run else "base", {"run": cfg.run} if cfg.run else {"model": cfg.model})
    out = [main]
    for other in cfg.compare:
        if other == "base":
            if not cfg.run:
                raise ValueError("--compare base needs --run (it names the run's base model)")
            out.insert(0, ("base", {"model": read_run(cfg.run)["base_model"]}))
        elif (Path(other) / "adapter_config.json").exists():
            out.append((Path(other).name, {"run": other}))
        else:
            out.append((other, {"model": other}))
    return out


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    models = _models(cfg)  # argument mistakes before any loading
    split, ds = _split(cfg)
    out = Path(cfg.output or (Path(cfg.run) / "eval" if cfg.run else "eval"))
    (out / "images").mkdir(parents=True, exist_ok=True)
    if is_conversation(ds.column_names, cfg):
        return _evaluate_conversations(cfg, models, split, ds, out)

    images = [
        as_image(v, f"row {i}, column {cfg.image_column!r}") for i, v in enumerate(ds[cfg.image_column])
    ]
    references = {str(i): _references(v, i) for i, v in enumerate(ds[cfg.text_column])}
    questions = [str(q) for q in ds[cfg.question_column]] if cfg.question_column else None
    captions: dict[str, list[str]] = {}
    table: dict[str, dict[str, float]] = {}
    info: dict[str, Any] = {}
    gen = {"max_new_tokens": cfg.max_new_tokens, "num_beams": cfg.num_beams}
    for label, source in models:
        captioner = Captioner.load(dtype=cfg.dtype, engine=cfg.engine, **source)
        task = "answering" if questions else "captioning"
        print(f"{task} {len(images)} images of split {split!r} with {label} ...", flush=True)
        if questions:
            got = captioner.answer(images, questions, batch_size=cfg.batch_size, **gen)
            table[label] = vqa_scores(got, [references[str(i)] for i in range(len(got))])
            info = {"tokenizer": "none: answers normalised as the official VQA evaluation does", "notes": []}
        else:
            got = captioner.caption(images, batch_size=cfg.batch_size, **gen)
            result = caption_scores({str(i): c for i, c in enumerate(got)}, references)
            table[label] = result["scores"]
            info = {k: result[k] for k in ("tokenizer", "notes")}
        captions[label] = got
        del captioner

    sources = _sources(ds, cfg.image_column)
    image_ids = list(ds["image_id"]) if "image_id" in ds.column_names else None
    rows = []
    for i, image in enumerate(images):
        _thumbnail([image]).save(out / "images" / f"{i:05d}.png")
        row = {
            "id": i,
            "source": sources[i],  # the user's own file, to join predictions back to their data
            "image": f"images/{i:05d}.png",
            "references": references[str(i)],
            "captions": {label: captions[label][i] for label in captions},
        }
        if image_ids is not None:
            row["image_id"] = _coco_id(image_ids[i])
        if questions:
            row["question"] = questions[i]
        rows.append(row)
    if image_ids is not None and not questions:
        # COCO's own result format, which its evaluation tools (and leaderboards) read: one caption an image.
        last = list(captions)[-1]
        results = [{"image_id": r["image_id"], "caption": r["captions"][last]} for r in rows]
        write_text(out / "coco_results.json", json.dumps(results) + "\n")
    svg = loss_svg(Path(cfg.run) / METRICS_FILE) if cfg.run else None
    if svg:
        (out / "loss.svg").write_text(svg)
    write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "data": cfg.data,
        "split": split,
        "images": len(images),
        "metrics": table,
        **info,
        "metric_implementation": f"pycocoevalcap {_version('pycocoevalcap')} (COCO caption evaluation)",
        "versions": versions(),
    }
    _record(cfg, out, summary)
    title = f"vlmtune evaluation: {cfg.run or cfg.model} on {cfg.data} ({split})"
    write_report(
        out, title, table, rows, info["notes"] + [f"Tokenizer: {info['tokenizer']}."], svg is not None
    )
    _print_table(table)
    print(f"\nwrote {out / 'metrics.json'}, {out / 'predictions.jsonl'} and {out / 'report.html'}")
    return summary


SHORT = 3  # words: a reply this short is an answer (VQA accuracy); a longer one a caption (COCO metrics)


def _evaluate_conversations(
    cfg: EvaluateConfig, models: list[tuple[str, dict[str, str]]], split: str, ds: Any, out: Path
) -> dict[str, Any]:
    """Every assistant turn of every conversation, generated after the reference history (the turns before it
    as the data has them) and scored: exact match over all turns, VQA accuracy over short replies, COCO
    caption metrics over the others. The report shows each turn with its dialogue."""
    replies: dict[str, list[str]] = {}
    table: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    items: list[dict[str, Any]] = []
    for label, source in models:
        captioner = Captioner.load(dtype=cfg.dtype, engine=cfg.engine, **source)
        examples = ConversationExamples(
            ds, cfg.messages_column, cfg.images_column, captioner.prompting(), per_turn=True
        )
        items = [examples[k] for k in range(len(examples))]
        most = captioner.family.max_images
        over = sorted({x["index"] for x in items if most is not None and len(x["images"]) > most})
        if over:
            raise DataError(
                f"row(s) {', '.join(map(str, over))}: more images than {captioner.family.name} reads ({most} per "
                "conversation)"
            )
        print(f"replying to {len(items)} turns of split {split!r} with {label} ...", flush=True)
        got: list[str] = []
        for start in range(0, len(items), cfg.batch_size):
            chunk = items[start : start + cfg.batch_size]
            got += captioner.generate(
                [x["images"] for x in chunk],
                [x["prompt"] for x in chunk],
                history=[x["history"] for x in chunk],
                turn_images=[x["turn_images"] for x in chunk],
                batch_size=len(chunk),
                max_new_tokens=cfg.max_new_tokens,
                num_beams=cfg.num_beams,
            )
        table[label], notes = _turn_scores(got, [x["target"] for x in items])
        replies[label] = got
        del captioner
    rows = []
    for k, x in enumerate(items):
        _thumbnail(x["images"]).save(out / "images" / f"{k:05d}.png")
        said = " | ".join(f"{p} {a}".strip() for p, a in x["history"])
        rows.append(
            {
                "id": k,
                "row": x["index"],
                "turn": len(x["history"]),
                "image": f"images/{k:05d}.png",
                "question": f"{said} | {x['prompt']}" if said else x["prompt"],
                "references": [x["target"]],
                "captions": {label: replies[label][k] for label in replies},
            }
        )
    write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "data": cfg.data,
        "split": split,
        "conversations": len(ds),
        "turns": len(items),
        "metrics": table,
        "notes": notes,
        "versions": versions(),
    }
    _record(cfg, out, summary)
    title = f"vlmtune evaluation: {cfg.run or cfg.model} on {cfg.data} ({split}, every assistant turn)"
    write_report(out, title, table, rows, notes, False)
    _print_table(table)
    print(f"\nwrote {out / 'metrics.json'}, {out / 'predictions.jsonl'} and {out / 'report.html'}")
    return summary


def _turn_scores(got: list[str], targets: list[str]) -> tuple[dict[str, float], list[str]]:
    """Exact match over every turn; VQA accuracy over the short replies, COCO metrics over the long ones."""
    scores = {"exact match": vqa_scores(got, [[t] for t in targets])["exact match"]}
    short = [k for k, t in enumerate(targets) if len(t.split()) <= SHORT]
    long = [k for k in range(len(targets)) if k not in set(short)]
    notes = [f"{len(short)} short replies (at most {SHORT} words), {len(long)} long ones."]
    if short:
        scores["VQA accuracy (short)"] = vqa_scores([got[k] for k in short], [[targets[k]] for k in short])[
            "VQA accuracy"
        ]
    if long:
        result = caption_scores({str(k): got[k] for k in long}, {str(k): [targets[k]] for k in long})
        scores |= {f"{m} (long)": v for m, v in result["scores"].items()}
        notes += result["notes"]
    return scores, notes


def _thumbnail(images: list[Any]) -> Any:
    """The gallery's picture of an example: its images side by side, each at most THUMBNAIL pixels."""
    from PIL import Image

    thumbs = []
    for image in images:
        thumbs.append(image.copy())
        thumbs[-1].thumbnail((THUMBNAIL, THUMBNAIL))
    if len(thumbs) == 1:
        return thumbs[0]
    strip = Image.new(
        "RGB", (sum(t.width for t in thumbs) + 4 * (len(thumbs) - 1), max(t.height for t in thumbs)), "white"
    )
    x = 0
    for t in thumbs:
        strip.paste(t, (x, 0))
        x += t.width + 4
    return strip


def _sources(ds: Any, column: str) -> list[str | None]:
    """Each row's image file as the dataset names it (None for images stored as bytes alone)."""
    from .data.checks import raw_images

    return [file_of(v) for v in iter_column(raw_images(ds, column), column)]


def _coco_id(value: Any) -> Any:
    """COCO image ids are integers; vlmtune's COCO reader keeps them as text."""
    return int(value) if isinstance(value, str) and value.isdigit() else value


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def _print_table(table: dict[str, dict[str, float]]) -> None:
    metrics = list(next(iter(table.values())))
    width = max(len(m) for m in table) + 2
    print("\n" + "".ljust(width) + "".join(f"{m:>10}" for m in metrics))
    for label, scores in table.items():
        print(label.ljust(width) + "".join(f"{scores[m]:>10.4f}" for m in metrics))
