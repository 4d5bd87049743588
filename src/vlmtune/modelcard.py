"""The run directory's model card (`README.md`): what the Hub shows for a pushed adapter, in its format (a YAML
header the Hub reads: base model, library, pipeline, tags, datasets), then how to load the adapter, how it was
trained and, once `vlmtune evaluate` has run, its scores. Written from the run directory alone (its
`vlmtune.yaml`, `metrics.jsonl`, `best.json`, `eval/metrics.json`), so every command that changes what the
card says rewrites it: `train` (and its `best/`), `evaluate`.

It replaces the template peft's `save_pretrained` leaves there, whose fields are all "[More Information Needed]".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .atomic import write_text
from .rundir import METRICS_FILE, read_jsonl, read_run

CARD = "README.md"


def write_card(run: str | Path) -> Path:
    """(Re)write RUN_DIR/README.md from what the run directory holds; returns its path."""
    run = Path(run)
    info = read_run(run)
    write_text(run / CARD, card_text(run, info))
    return run / CARD


def card_text(run: Path, info: dict[str, Any]) -> str:
    cfg, base, family = info.get("config", {}), str(info["base_model"]), info.get("family", "?")
    on_hub = not Path(base).exists()  # a local directory (the tiny base) is no Hub id to link to
    header: dict[str, Any] = {"library_name": "peft", "pipeline_tag": "image-text-to-text"}
    if on_hub:
        header["base_model"] = base
    header["tags"] = ["vlmtune", "lora", family, "image-captioning"]
    data = str(cfg.get("data", ""))
    if data and not Path(data).exists():
        header["datasets"] = [data]
    name = run.name if run.name != "best" else f"{run.parent.name} (best)"
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    lines += [
        f"A LoRA adapter for `{base}` ({family}), fine-tuned with vlmtune on `{data}`."
        if on_hub
        else f"A LoRA adapter for a local base ({family}), fine-tuned with vlmtune on `{data}`.",
        "",
        "## Use it",
        "",
        "With plain transformers and peft:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        f'base = AutoModelForImageTextToText.from_pretrained("{base}")',
        'model = PeftModel.from_pretrained(base, "THIS_REPO_OR_DIRECTORY")',
        'processor = AutoProcessor.from_pretrained("THIS_REPO_OR_DIRECTORY")',
        "```",
        "",
        "With vlmtune (the prompt and end tokens it trained with, batched generation, a server):",
        "",
        "```bash",
        "vlmtune caption image.jpg --run THIS_DIRECTORY",
        'vlmtune ask image.jpg "what is in the picture?" --run THIS_DIRECTORY',
        "vlmtune serve --run THIS_DIRECTORY",
        "```",
        "",
        "## Training",
        "",
        *_table(["setting", "value"], _settings(cfg)),
        "",
        *_progress(run),
        *_evaluation(run),
        f"Versions: {', '.join(f'{k} {v}' for k, v in (info.get('versions') or {}).items())}.",
        "",
    ]
    return "\n".join(lines)


def _settings(cfg: dict[str, Any]) -> list[list[str]]:
    keys = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "scheduler", "warmup_ratio", "lora_r")
    keys += (
        "lora_alpha",
        "lora_dropout",
        "lm_dropout",
        "lora_targets",
        "train_modules",
        "max_length",
        "dtype",
        "quantize",
    )
    keys += ("prompt", "seed")
    return [[k, f"`{cfg[k]}`"] for k in keys if cfg.get(k) not in (None, "", [])]


def _progress(run: Path) -> list[str]:
    """The training loss at the start and the end, the last validation loss, the best checkpoint's record."""
    metrics = read_jsonl(run / METRICS_FILE) if (run / METRICS_FILE).exists() else []
    losses = [r for r in metrics if "loss" in r]
    vals = [r for r in metrics if "val_loss" in r]
    out = []
    if losses:
        first, last = losses[0], losses[-1]
        said = [
            f"{r['loss']:.4f} at step {r['step']}" for r in ([first, last] if last is not first else [last])
        ]
        out.append(f"Training loss {', '.join(said)}.")
    if vals:
        out.append(f"Validation loss {vals[-1]['val_loss']:.4f} at step {vals[-1]['step']}.")
    best = run / "best.json"
    if best.exists():
        record = json.loads(best.read_text())
        out.append(f"This is the best adapter by {record['metric']}: step {record['step']}.")
    return [" ".join(out), ""] if out else []


def _evaluation(run: Path) -> list[str]:
    """`vlmtune evaluate`'s table, when it has run on this directory."""
    path = run / "eval" / "metrics.json"
    if not path.exists():
        return []
    summary = json.loads(path.read_text())
    table = summary.get("metrics") or {}
    if not table:
        return []
    names = list(next(iter(table.values())))
    rows = [
        [label, *(f"{scores.get(m, float('nan')):.4f}" for m in names)] for label, scores in table.items()
    ]
    head = f"## Evaluation\n\n`vlmtune evaluate` on `{summary.get('data')}` (split `{summary.get('split')}`):"
    return [head, "", *_table(["model", *names], rows), ""]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
