"""--report-to: every tracker gets the numbers metrics.jsonl has, the settings, and evaluate's scores, read back
with each tracker's own reader, offline: MLflow from a sqlite store, W&B from its offline run files, trackio
from its local database, TensorBoard from its event files."""

import glob
import json
import struct
from pathlib import Path

import pytest

from vlmtune import tracking
from vlmtune.config import EvaluateConfig, TrainConfig
from vlmtune.errors import ConfigError
from vlmtune.evaluate import evaluate
from vlmtune.rundir import read_jsonl
from vlmtune.training.run import train


def wandb_records(run_dir) -> list:
    """Every record of every W&B offline run under `run_dir`: the `.wandb` file is a LevelDB-style log (32 KiB
    blocks, a 7-byte header per chunk) of W&B's own protobuf records, which `wandb sync` uploads."""
    from wandb.proto import wandb_internal_pb2

    out = []
    for path in sorted(glob.glob(f"{run_dir}/wandb/offline-run-*/run-*.wandb")):
        data, pos, chunk = Path(path).read_bytes(), 7, b""  # the file header: ":W&B", magic, version
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if length == 0 and kind == 0:
                break
            chunk += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunk)
                out.append(record)
                chunk = b""
    return out


def wandb_history(records) -> dict[str, dict[int, float]]:
    """{key: {step: value}} from the history records."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            step = r.history.step.num
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    out.setdefault(key, {})[step] = json.loads(item.value_json)
    return out


def test_every_tracker_gets_the_same_numbers(football, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    cfg = TrainConfig(
        model="tiny",
        data=football,
        output=str(tmp_path / "run"),
        max_steps=4,
        batch_size=8,
        log_every=1,
        val_split="validation",
        eval_every=2,
        sample_every=0,
        num_samples=0,
        lr=2e-3,
        report_to=["tensorboard,mlflow", "wandb", "trackio"],
        tracker_project="footballers",
    )
    run = train(cfg)
    losses = {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}
    val = {r["step"]: r["val_loss"] for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r}
    assert sorted(losses) == [1, 2, 3, 4] and sorted(val) == [2, 4]
    evaluate(EvaluateConfig(run=str(run), data=football, limit=4))
    scores = json.loads((run / "eval" / "metrics.json").read_text())["metrics"]["fine-tuned"]
    ids = tracking.read_ids(run)
    assert set(ids) == {"mlflow", "wandb", "trackio", "settings"}

    # MLflow, through its client on the sqlite store
    from mlflow import MlflowClient

    client = MlflowClient(store)
    mlflow_run = client.get_run(ids["mlflow"]["run_id"])
    assert client.get_experiment(mlflow_run.info.experiment_id).name == "footballers"
    assert mlflow_run.data.params["lr"] == "0.002" and mlflow_run.data.params["family"] == "blip-2"
    history = {m.step: m.value for m in client.get_metric_history(mlflow_run.info.run_id, "train/loss")}
    assert history == pytest.approx(losses)
    assert {m.step: m.value for m in client.get_metric_history(mlflow_run.info.run_id, "val/val_loss")} == (
        pytest.approx(val)
    )
    assert mlflow_run.data.metrics["eval/CIDEr-D"] == pytest.approx(scores["CIDEr-D"])

    # W&B, from the offline run files (the training run, then evaluate's resumed one with the same id)
    records = wandb_records(run)
    assert {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"} == {ids["wandb"]["run_id"]}
    config = {
        item.key: json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
    }
    assert config["lr"] == 0.002 and config["batch_size"] == 8
    logged = wandb_history(records)
    assert logged["train/loss"] == pytest.approx(losses)
    assert logged["val/val_loss"] == pytest.approx(val)
    assert logged["eval/CIDEr-D"] == {4: pytest.approx(scores["CIDEr-D"])}

    # trackio, from its local database
    from trackio.sqlite_storage import SQLiteStorage

    rows = SQLiteStorage.get_logs("footballers", ids["trackio"]["run_id"])
    assert {r["step"]: r["train/loss"] for r in rows if "train/loss" in r} == pytest.approx(losses)
    assert [r["eval/CIDEr-D"] for r in rows if "eval/CIDEr-D" in r] == [pytest.approx(scores["CIDEr-D"])]
    assert SQLiteStorage.get_run_config("footballers", ids["trackio"]["run_id"])["lora_r"] == 16

    # TensorBoard, from its event files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [
        EventAccumulator(str(d)).Reload()
        for d in {p.parent for p in (run / "tensorboard").rglob("*tfevents*")}
    ]
    shown = {
        e.step: e.value
        for a in events
        if "train/loss" in a.Tags()["scalars"]
        for e in a.Scalars("train/loss")
    }
    assert shown == pytest.approx(losses, rel=1e-6)
    evaluated = [
        e.value for a in events if "eval/CIDEr-D" in a.Tags()["scalars"] for e in a.Scalars("eval/CIDEr-D")
    ]
    assert evaluated == [pytest.approx(scores["CIDEr-D"], rel=1e-6)]


def test_an_unknown_or_missing_tracker_is_a_config_error_before_any_loading(tmp_path, monkeypatch):
    monkeypatch.setitem(tracking.TRACKERS, "wandb", ("wandb_is_not_installed_here", "wandb"))
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        train(TrainConfig(model="tiny", output=str(out), report_to=["tensorboard,wandb", "neptune"]))
    said = str(e.value)
    assert "--report-to neptune: not a tracker vlmtune knows" in said
    assert "--report-to wandb needs the wandb package: pip install 'vlmtune[track]'" in said
    assert not out.exists()  # refused before the run directory, the data or the weights
    assert tracking.chosen("none") == [] and tracking.chosen(["mlflow, wandb", "mlflow"]) == [
        "mlflow",
        "wandb",
    ]
