"""Experiment trackers (`--report-to`): TensorBoard by default, and any of MLflow, Weights & Biases and trackio,
through Accelerate's trackers. Each one gets the same numbers: the run's settings at the start, train/loss and
train/lr every --log-every steps, val/* at each validation, and eval/* when `vlmtune evaluate --run` scores
the run.

Where each writes: TensorBoard into RUN_DIR/tensorboard; MLflow to its tracking URI (MLFLOW_TRACKING_URI, e.g.
`sqlite:///mlflow.db` or a server); W&B under RUN_DIR/wandb, online or offline as WANDB_MODE says; trackio to
its local database (TRACKIO_DIR) or the Space it is pointed at. RUN_DIR/trackers.json keeps each tracker's run
id, so a resumed run, and `vlmtune evaluate --run` after it, log into the same runs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

from .atomic import write_text

# the name --report-to takes -> (the module it imports, the pip package that has it)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
}
IDS_FILE = "trackers.json"


def chosen(report_to: list[str] | str) -> list[str]:
    """The tracker names in `report_to`: comma- or space-separated items, `none` for no tracker."""
    items = [report_to] if isinstance(report_to, str) else report_to
    names = [n.strip().lower() for item in items for n in item.split(",") if n.strip()]
    return [] if names == ["none"] else list(dict.fromkeys(names))


def problems(report_to: list[str] | str) -> list[str]:
    """What is wrong with `report_to`: unknown names and trackers whose package is not installed."""
    out = []
    for name in chosen(report_to):
        if name not in TRACKERS:
            out.append(
                f"--report-to {name}: not a tracker vlmtune knows; choose from {', '.join(TRACKERS)} (or none)"
            )
        elif importlib.util.find_spec(TRACKERS[name][0]) is None:
            package = TRACKERS[name][1]
            out.append(
                f"--report-to {name} needs the {package} package: pip install 'vlmtune[track]' (or {package})"
            )
    return out


def settings(cfg: Any, **extra: Any) -> dict[str, bool | int | float | str]:
    """`cfg` (a dataclass) and `extra` as flat hyperparameters every tracker takes: unset options left out, lists
    joined with commas."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in {**dataclasses.asdict(cfg), **extra}.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        out[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def trackers(report_to: list[str] | str, run: Path, project: str) -> list[Any]:
    """Accelerate tracker objects for `report_to`, not started yet (`start` starts them)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    ids = read_ids(run)
    made = {
        "tensorboard": lambda: TensorBoardTracker("tensorboard", run),
        "mlflow": lambda: MLflowTracker(
            experiment_name=project, run_name=run.name, run_id=ids.get("mlflow", {}).get("run_id")
        ),
        # resume="allow": the same W&B run again when trackers.json names one, a new one otherwise
        "wandb": lambda: WandBTracker(
            project, dir=str(run), name=run.name, id=ids.get("wandb", {}).get("run_id"), resume="allow"
        ),
        "trackio": lambda: TrackioTracker(
            project, name=ids.get("trackio", {}).get("run_id", run.name), resume="allow"
        ),
    }
    return [made[name]() for name in chosen(report_to)]


def start(
    accelerator: Any, run: Path, hyperparameters: dict[str, Any], resumed_at: int | None = None
) -> None:
    """Start the accelerator's trackers, log `hyperparameters`, and keep their run ids in RUN_DIR/trackers.json.

    `resumed_at`: the step a resumed run goes on from; TensorBoard drops what it logged after it (those steps are
    done again). MLflow and trackio keep both copies of a redone step; W&B keeps the first (its steps only grow).
    """
    for tracker in accelerator.log_with:
        if getattr(tracker, "name", None) == "tensorboard" and resumed_at is not None:
            tracker.init_kwargs["purge_step"] = resumed_at + 1
    accelerator.init_trackers("vlmtune", config=hyperparameters)
    if accelerator.is_main_process and accelerator.trackers:
        write_ids(run, accelerator.trackers, hyperparameters)


def read_ids(run: Path) -> dict[str, dict[str, str]]:
    path = Path(run) / IDS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def write_ids(run: Path, started: list[Any], hyperparameters: dict[str, Any]) -> None:
    ids = read_ids(run)
    ids["settings"] = hyperparameters  # given again with evaluate's scores: trackio keeps a run's last ones
    for tracker in started:
        if tracker.name == "mlflow":
            import mlflow

            run_id = tracker.tracker.info.run_id
            ids["mlflow"] = {"run_id": run_id, "tracking_uri": mlflow.get_tracking_uri()}
            ids["mlflow"]["experiment"] = tracker.experiment_name
        elif tracker.name == "wandb":
            ids["wandb"] = {"run_id": tracker.tracker.id, "project": tracker.tracker.project}
        elif tracker.name == "trackio":
            ids["trackio"] = {"run_id": tracker.tracker.name, "project": tracker.run_name}
    write_text(Path(run) / IDS_FILE, json.dumps(ids, indent=2) + "\n")


def log_evaluation(run: Path, numbers: dict[str, float]) -> list[str]:
    """`numbers` (eval/...) into the trackers the run at `run` was trained with, at its last step: the same
    TensorBoard directory, MLflow, W&B and trackio runs. Returns the trackers' names."""
    import os

    from accelerate import Accelerator

    from .rundir import METRICS_FILE, read_jsonl, read_run

    cfg = read_run(run)["config"]
    names = [n for n in chosen(cfg.get("report_to", ["tensorboard"])) if n not in problems([n])]
    if not names:
        return []
    ids = read_ids(run)
    if "mlflow" in ids and "MLFLOW_TRACKING_URI" not in os.environ:
        import mlflow

        mlflow.set_tracking_uri(ids["mlflow"]["tracking_uri"])  # where training logged, not the default
    logged = Path(run) / METRICS_FILE
    step = max((r["step"] for r in read_jsonl(logged) if "step" in r), default=0) if logged.exists() else 0
    from accelerate.state import AcceleratorState

    # one precision per process: whatever an earlier Accelerator here (a train() before) set
    mixed = AcceleratorState().mixed_precision if AcceleratorState._shared_state else "no"
    accelerator = Accelerator(
        mixed_precision=mixed, log_with=trackers(names, Path(run), cfg.get("tracker_project", "vlmtune"))
    )
    accelerator.init_trackers("vlmtune", config=ids.get("settings"))
    accelerator.log(numbers, step=step)
    accelerator.end_training()
    return names
