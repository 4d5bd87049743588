"""The run directory: the one thing every command after `train` consumes.

    RUN_DIR/
      adapter_config.json, adapter_model.safetensors   peft's save_pretrained (loads with plain peft)
      processor_config.json, tokenizer*.json           the processor training used
      vlmtune.yaml                                      resolved config, base model, family, versions
      metrics.jsonl                                     one line per logged step / validation
      samples.jsonl                                     captions generated during training
      tensorboard/                                      the same numbers for TensorBoard
      checkpoints/step-XXXXXXXX/                        training state for --resume (see checkpoint.py)

The adapter sits at the top level, so the directory is also a plain peft adapter directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

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
    atomic_write_text(run / CONFIG_FILE, yaml.safe_dump(doc, sort_keys=False))


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


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a config is for everyone who can read the run
    os.replace(tmp, path)


def save_atomically(run: Path, write: Any) -> None:
    """Call `write(tmp_dir)`, then move each file it wrote into `run`.

    Files land by `os.replace`, so a crash mid-save leaves every file either the old or the new version, never
    half-written; the adapter config goes last, so a run only looks finished once its weights are in place.
    """
    tmp = Path(tempfile.mkdtemp(dir=run, prefix=".saving-"))
    try:
        write(tmp)
        files = sorted(tmp.rglob("*"), key=lambda p: p.name == "adapter_config.json")
        for f in files:
            if f.is_file():
                dest = run / f.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(new: Path, target: Path) -> None:
    """Put the finished directory `new` at `target`, with no moment at which `target` holds no complete
    version: a first one is renamed in; an existing one is swapped with it in one atomic step
    (`renameat2(RENAME_EXCHANGE)`, Linux), then removed. Where that call is missing, the old version is
    renamed aside first, so the gap is two renames long, and the old one stays beside the target if the
    second fails."""
    if not target.exists():
        new.rename(target)
        return
    if _exchange(new, target):
        shutil.rmtree(new)  # now the old version
        return
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system cannot."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), exchange) == 0


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
