"""`vlmtune models`: the families vlmtune trains, read from the registry (nothing here is written twice)."""

from __future__ import annotations

from typing import Any

from .config import ModelsConfig
from .families import FAMILIES


def rows() -> list[dict[str, Any]]:
    return [
        {
            "family": f.name,
            "hub_ids": list(f.hub_ids),
            "lora": f.lora,
            "train_modules": dict(f.groups),
            "cache": f.cache,
            "images": "one" if f.max_images == 1 else f"up to {f.max_images}" if f.max_images else "several",
            "caption_prompt": f.caption_prompt,
            "question_template": f.question_template,
            "memory": f.memory,
        }
        for f in FAMILIES
    ]


def models(cfg: ModelsConfig) -> list[dict[str, Any]]:
    """Print each family: the checkpoints it was written for, its LoRA targets, groups, cache and memory."""
    table = rows()
    if cfg.json:
        import json

        print(json.dumps(table, indent=2))
        return table
    for row in table:
        print(f"{row['family']}")
        print(f"  checkpoints:     {', '.join(row['hub_ids'])}")
        print(f"  LoRA (default):  {row['lora']}")
        groups = "; ".join(f"{g}: {why}" for g, why in row["train_modules"].items()) or "none"
        print(f"  --train-modules: {groups}")
        print(f"  feature cache:   {row['cache']}")
        print(f"  images:          {row['images']} per example")
        print(f"  prompts:         caption {row['caption_prompt']!r}, question {row['question_template']!r}")
        print(f"  memory:          {row['memory']}\n")
    print("--model takes a hub id or a local directory of any of these; the family is read from its config.")
    return table
