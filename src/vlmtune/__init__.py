"""vlmtune: LoRA fine-tuning, captioning and visual question answering for vision-language models.

from vlmtune import TrainConfig, train, Captioner
run = train(TrainConfig(model="tiny", data="data/football-synth", output="runs/mine"))
print(Captioner.from_run(run).caption([image]))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names -> defining module, imported on first use so `vlmtune --help` does not wait for torch.
_API = {
    "TrainConfig": "config",
    "CaptionConfig": "config",
    "AskConfig": "config",
    "MergeConfig": "config",
    "ConfigError": "config",
    "train": "training.run",
    "Captioner": "infer",
    "caption": "infer",
    "ask": "infer",
    "merge": "export",
    "load_splits": "data.sources",
    "family_for": "families",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'vlmtune' has no attribute {name!r}")
