"""The run directory: the one thing every command after `train` consumes.

    RUN_DIR/
      adapter_config.json, adapter_model.safetensors   peft's save_pretrained (loads with plain peft)
      processor_config.json, tokenizer*.json           the processor training used
      vlmtune.yaml                                      resolved config, base model, family, versions
      README.md                                         the model card (the Hub's format; see modelcard.py)
      metrics.jsonl                                     one line per logged step / validation
      samples.jsonl                                     captions generated during training
      tensorboard/                                      the same numbers for TensorBoard
      checkpoints/step-XXXXXXXX/                        training state for --resume (see training/checkpoint.py)

The adapter sits at the top level, so the directory is also a plain peft adapter directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from .atomic import write_text
from .errors import RunDirError

CONFIG_FILE = "vlmtune.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


def versions() -> dict[str, str]:
    import accelerate
    import peft
    import torch
    import transformers

    from . import __version__

    return {
        "vlmtune": __version__,
        "vlmtune_git": _git_commit(),
        "torch": str(torch.__version__),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }


def _git_commit() -> str | None:
    """The commit vlmtune runs from (an editable install in a checkout), '+dirty' with local changes."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return commit.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_config(run: Path, cfg: Any, base_model: str, family: str, device: str) -> None:
    doc = {
        "base_model": base_model,
        "family": family,
        "config": dataclasses.asdict(cfg),
        "device": device,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_text(run / CONFIG_FILE, yaml.safe_dump(doc, sort_keys=False))


def read_run(run: str | os.PathLike) -> dict[str, Any]:
    """The run's recorded config; a clear error when `run` is not a finished run directory."""
    path = Path(run)
    if not path.is_dir():
        raise RunDirError(f"run directory {path} does not exist")
    missing = [f for f in (CONFIG_FILE, "adapter_config.json") if not (path / f).exists()]
    if missing:
        raise RunDirError(
            f"{path} is not a finished vlmtune run directory (missing {', '.join(missing)}); "
            "point --run at the --output of a completed `vlmtune train`"
        )
    return yaml.safe_load((path / CONFIG_FILE).read_text())


class JsonlLog:
    """Append-only JSON lines, flushed per line so a crash keeps everything logged so far."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled  # disabled: a process that is not the one writing logs

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
