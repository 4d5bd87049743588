"""Several processes: `torchrun` starting two CPU processes (DDP over gloo; `ACCELERATE_USE_CPU` is how
Accelerate is told they have no GPU). Each process trains on its own half of every epoch: two processes at
batch 4 take the same global batches, schedule and losses as one process at batch 8."""

import os
import subprocess
import sys

import pytest

from vlmtune.config import TrainConfig
from vlmtune.finetune import train
from vlmtune.rundir import read_jsonl

pytestmark = pytest.mark.slow

ARGS = [
    "--model",
    "tiny",
    "--epochs",
    "1",
    "--sample-every",
    "0",
    "--num-samples",
    "0",
    "--log-every",
    "5",
    "--lr",
    "3e-3",
    "--lora-dropout",
    "0",
]


def test_two_processes_split_each_epoch(football, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "vlmtune",
        "train",
        "--data",
        football,
        "--output",
        str(run),
        "--batch-size",
        "4",
        *ARGS,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    logged = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    # 240 examples, 2 processes x 4: 30 optimizer steps; one process writes the log, each step once.
    assert [r["step"] for r in logged] == [5, 10, 15, 20, 25, 30]
    timing = read_jsonl(run / "metrics.jsonl")[-1]
    assert timing["train_samples"] == 240
    assert logged[-1]["lr"] == 0.0  # the schedule, sized for the processes, ends with the epoch

    single = train(
        TrainConfig(
            data=football,
            output=str(tmp_path / "one"),
            batch_size=8,
            model="tiny",
            epochs=1,
            sample_every=0,
            num_samples=0,
            log_every=5,
            lr=3e-3,
            lora_dropout=0.0,
        )
    )
    alone = [r for r in read_jsonl(single / "metrics.jsonl") if "loss" in r]
    assert [r["lr"] for r in logged] == pytest.approx([r["lr"] for r in alone])
    # The same examples in each global batch: the losses agree up to how the two halves' means are weighted.
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in alone], rel=0.05)
    assert (run / "adapter_model.safetensors").exists()
