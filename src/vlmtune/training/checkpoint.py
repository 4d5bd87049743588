"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    RUN_DIR/checkpoints/step-00000120/
      trainable.safetensors   the parameters that train (LoRA, and modules_to_save): not the frozen base
      optimizer.pt, scheduler.pt, scaler.pt (fp16 only)
      rng.pt                  python, numpy, torch and CUDA generator states (rng.N.pt: process N's)
      state.json              step, epoch, batches consumed in that epoch, samples seen, the loss window;
                              written last, so a directory without it is incomplete and ignored

A checkpoint is written under a temporary name beside its place and renamed there (`atomic.build_dir`): a
crash mid-write leaves the previous checkpoints untouched and loadable. The newest `keep` are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import build_dir, remove_abandoned

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class LoopState:
    """Where the loop is: restored on resume so the run continues as if it never stopped."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    batches_in_epoch: int = 0  # batches of `epoch` already consumed
    samples: int = 0
    bad_steps_in_a_row: int = 0
    bad_steps_total: int = 0
    window: list[float] = field(default_factory=list)  # losses since the last log line
    best: float | None = None  # the best --best-metric so far (its adapter is in RUN_DIR/best)


def checkpoint_dir(run: Path) -> Path:
    return run / CHECKPOINTS


def complete_checkpoints(run: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = checkpoint_dir(run)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_resume(run: Path, resume: str) -> Path:
    """`auto` -> the newest complete checkpoint of `run`; anything else is a checkpoint directory."""
    if resume == "auto":
        found = complete_checkpoints(run)
        if not found:
            raise FileNotFoundError(f"--resume auto: {checkpoint_dir(run)} holds no complete checkpoint")
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no state.json)")
    return path


def _trainable(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    """This process's random generators: python, numpy, torch and (where there is one) CUDA."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def save_checkpoint(
    run: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    state: LoopState,
    keep: int,
    rngs: list[dict[str, Any]] | None = None,
) -> Path:
    """A checkpoint directory for `state`. `rngs` holds what differs by process, in rank order: random
    generators, and the losses since the last log line under "window" (default: this process's generators)."""
    root = checkpoint_dir(run)
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned(root)
    final = root / f"step-{state.step:08d}"

    def write(tmp: Path) -> None:
        tmp.mkdir()
        save_file(_trainable(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        for rank, rng in enumerate(rngs or [rng_state()]):  # rng.pt, then rng.1.pt, ... for other processes
            torch.save(rng, tmp / ("rng.pt" if rank == 0 else f"rng.{rank}.pt"))
        (tmp / "state.json").write_text(json.dumps(asdict(state)))  # last: marks the checkpoint complete

    build_dir(final, write)  # a checkpoint of the same step (a resumed run's) is replaced with no gap
    for old in complete_checkpoints(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any, rank: int = 0
) -> LoopState:
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(set(weights) ^ {n for n, p in params.items() if p.requires_grad})
    if missing:
        raise ValueError(
            f"checkpoint {path} does not match this model's trainable parameters (e.g. {missing[0]}): "
            "resume with the configuration that wrote it"
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    own = path / f"rng.{rank}.pt"  # each process resumes with its own generators (dropout differs by rank)
    rng = torch.load(own if rank and own.exists() else path / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = LoopState(**json.loads((path / "state.json").read_text()))
    if "window" in rng:  # this process's losses since the last log line (state.json holds the main one's)
        state.window = rng["window"]
    return state


def truncate_logs(run: Path, step: int) -> None:
    """Drop log lines past `step` (written after the checkpoint a run resumes from), so none repeats."""
    from ..atomic import write_text
    from ..rundir import METRICS_FILE, SAMPLES_FILE

    for name in (METRICS_FILE, SAMPLES_FILE):
        path = run / name
        if path.exists():
            keep = [
                line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step
            ]
            write_text(path, "".join(line + "\n" for line in keep))
