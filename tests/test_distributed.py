"""Several processes: `torchrun` starting two CPU processes (DDP over gloo; `ACCELERATE_USE_CPU` is how
Accelerate is told they have no GPU). Each process trains on its own half of every epoch: two processes at
batch 4 take the same global batches, schedule and losses as one process at batch 8."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmtune.config import TrainConfig
from vlmtune.rundir import read_jsonl
from vlmtune.training.run import train

pytestmark = pytest.mark.slow


def torchrun(football, run, *extra):
    """`vlmtune train` in two CPU processes; flags in `extra` override the ones here (the last one counts)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
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
        "--model",
        "tiny",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--save-every",
        "10",
        "--sample-every",
        "0",
        "--num-samples",
        "0",
        "--log-every",
        "5",
        "--lr",
        "3e-3",
        "--lora-dropout",
        "0.1",
        "--seed",
        "3",
        *extra,
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """The run's stderr once it ends; a run that hangs is killed with its workers and fails the test."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        pytest.fail(f"the two-process run did not end within {timeout:g} s:\n{proc.communicate()[1][-3000:]}")


def workers(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def test_two_processes_split_each_epoch(football, tmp_path):
    run = tmp_path / "ddp"
    err = finish(torchrun(football, run, "--lora-dropout", "0", "--save-every", "0"))
    assert (run / "adapter_model.safetensors").exists(), err[-3000:]

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
            seed=3,
        )
    )
    alone = [r for r in read_jsonl(single / "metrics.jsonl") if "loss" in r]
    assert [r["lr"] for r in logged] == pytest.approx([r["lr"] for r in alone])
    # The same examples in each global batch: the losses agree up to how the two halves' means are weighted.
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in alone], rel=0.05)
    assert (run / "adapter_model.safetensors").exists()


def test_a_stopped_multi_process_run_resumes_bitwise(football, tmp_path):
    """SIGTERM to one of two processes: both stop at the same step and checkpoint (with each process's random
    generators); the resumed run ends with the adapter and losses of the run that was never stopped."""
    import signal
    import time

    from safetensors.torch import load_file

    from vlmtune.training.checkpoint import complete_checkpoints

    straight = tmp_path / "straight"
    err = finish(torchrun(football, straight))
    assert (straight / "adapter_model.safetensors").exists(), err[-3000:]

    run = tmp_path / "stopped"
    proc = torchrun(football, run)
    deadline = time.time() + 300
    while not complete_checkpoints(run) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.kill(workers(proc.pid)[-1], signal.SIGTERM)  # the other process learns of it at the next step
    err = finish(proc)
    assert proc.returncode != 0 and "SIGTERM: finishing this step" in err, err[-3000:]
    assert not (run / "adapter_model.safetensors").exists()
    stopped_at = int(complete_checkpoints(run)[-1].name.split("-")[1])
    assert 10 <= stopped_at < 30

    err = finish(torchrun(football, run, "--resume", "auto"))
    a, b = (
        load_file(str(straight / "adapter_model.safetensors")),
        load_file(str(run / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), err[-3000:]
    losses = [[r["loss"] for r in read_jsonl(d / "metrics.jsonl") if "loss" in r] for d in (straight, run)]
    assert losses[0] == losses[1] and len(losses[0]) == 6


CACHE_CASES = [
    "shared",
    "kept",
    "apart",
    "apart-disk",
    "kept-apart",
    "bf16-apart",
    "ragged",
    "ragged-kept-apart",
]


@pytest.fixture(scope="module")
def cache_passes(football, tmp_path_factory):
    """Every case of the shared cache pass, computed by one process alone and by two together (one launch
    each: the worker runs the cases in turn)."""
    worker = [str(Path(__file__).parent / "cache_worker.py"), football]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    alone, shared = tmp_path_factory.mktemp("alone"), tmp_path_factory.mktemp("shared")
    cases = ",".join(CACHE_CASES)
    done = subprocess.run(
        [sys.executable, *worker, str(alone), cases], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*launch, *worker, str(shared), cases], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return alone, shared


@pytest.mark.parametrize("where", CACHE_CASES)
def test_processes_share_the_feature_cache_pass(cache_passes, where):
    """Each of two processes runs half the images through the vision side, and both end with the whole
    cache, equal to what one process computes alone. On one machine: in one file both processes map, which
    leaves no file behind; kept for later runs, which both then read. As if on two machines: in memory, or too
    big for it in a file of each process's own, with the shares exchanged, kept, and in bfloat16, which
    travels as bytes. Features of a varying length per image (`ragged`) take the same ways."""
    alone, shared = (d / where for d in cache_passes)
    reference = torch.load(alone / "rank0.pt", weights_only=False)
    ranks = [torch.load(shared / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert reference["images"] == 240 and [r["images"] for r in ranks] == [120, 120]
    alone_kind = "Ragged" if "ragged" in where else "DiskFeatures" if "disk" in where else "Tensor"
    assert reference["kind"].__name__ == alone_kind  # one process
    if "ragged" in where:  # the lengths do vary
        assert len({len(f) for f in reference["features"]}) > 3
    files = [r["mapped"] for r in ranks]
    if "apart" not in where:  # one file for the machine, not one per process
        assert len(files[0]) == 1 and files[0] == files[1]
    elif "disk" in where:
        assert len(files[0]) == len(files[1]) == 1 and files[0] != files[1]
    assert not list(shared.glob("*.npy*")) and not list(shared.glob("kept/*.tmp"))
    for r in ranks:
        in_memory = where in ("apart", "kept-apart", "bf16-apart")
        assert r["kind"].__name__ == (
            "Ragged" if "ragged" in where else "Tensor" if in_memory else "DiskFeatures"
        )
        tight = {} if "bf16" in where else dict(rtol=1e-5, atol=1e-6)  # bf16: its own default tolerance
        torch.testing.assert_close(r["features"], reference["features"], **tight)


def test_a_trained_qformer_on_cached_vision_features_stays_in_step(football, tmp_path):
    """With --train-qformer the Q-Former runs on the cached ViT output outside the model's forward; its
    gradients must still be exchanged: two processes give bit for bit the adapter they give without a cache."""
    from safetensors.torch import load_file

    runs = {}
    for mode in ("auto", "off"):
        run = tmp_path / mode
        flags = ("--train-qformer", "--vision-cache", mode, "--lora-dropout", "0", "--save-every", "0")
        err = finish(torchrun(football, run, *flags))
        assert (run / "adapter_model.safetensors").exists(), err[-3000:]
        runs[mode] = load_file(str(run / "adapter_model.safetensors"))
    assert any("qformer" in k for k in runs["auto"])
    assert all(torch.equal(runs["auto"][k], runs["off"][k]) for k in runs["off"])


def test_validation_covers_every_example_once_across_processes(football, tmp_path):
    """Each process validates every other example and the sums are added up: the logged validation loss is the
    one a single process computes over the whole held-out split with the final adapter; caption metrics are
    gathered and scored once, and every process agrees on the best adapter."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from vlmtune.data.batching import Collator
    from vlmtune.data.examples import CaptionExamples
    from vlmtune.data.sources import load_splits
    from vlmtune.modeling import load_for_inference
    from vlmtune.training.loop import evaluate_loss

    run = tmp_path / "val"
    flags = ("--val-fraction", "0.25", "--eval-metrics", "--lora-dropout", "0", "--save-every", "0")
    err = finish(torchrun(football, run, *flags))
    assert (run / "best" / "best.json").exists(), err[-3000:]
    logged = [r for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]
    assert len(logged) == 1 and "BLEU-1" in logged[0]  # one epoch: validated once, at its end

    model, processor, family, _ = load_for_inference(str(run), None, dtype="float32")
    _, held_out = load_splits(football, val_fraction=0.25, seed=3)
    loader = DataLoader(CaptionExamples(held_out), batch_size=5, collate_fn=Collator(family, processor, 64))
    alone = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    assert logged[0]["val_loss"] == pytest.approx(
        evaluate_loss(model, family, loader, torch.float32, alone), rel=1e-5
    )


def test_a_stream_is_dealt_out_between_processes_and_resumes_bitwise(football, tmp_path):
    """--streaming with two processes: each keeps its half of the shuffled stream (tested to decode no other in
    test_stream.py), so the losses follow one process at twice the batch; stopped at a checkpoint and resumed,
    the two go on with the examples they had not reached and end with the same adapter bit for bit."""
    import shutil

    from datasets import load_from_disk
    from safetensors.torch import load_file

    rows = load_from_disk(football)["train"].select(range(64))
    data = str(tmp_path / "train.parquet")
    rows.to_parquet(data)
    flags = ["--data", data, "--streaming", "--max-steps", "6", "--shuffle-buffer", "32", "--log-every", "1"]
    flags += ["--lora-dropout", "0", "--save-every", "3"]
    full = tmp_path / "two"
    err = finish(torchrun(football, full, *flags))
    assert (full / "adapter_model.safetensors").exists(), err[-3000:]
    logged = [r["loss"] for r in read_jsonl(full / "metrics.jsonl") if "loss" in r]

    single = train(
        TrainConfig(
            data=data,
            output=str(tmp_path / "one"),
            streaming=True,
            max_steps=6,
            shuffle_buffer=32,
            batch_size=8,
            model="tiny",
            sample_every=0,
            num_samples=0,
            log_every=1,
            lr=3e-3,
            lora_dropout=0.0,
            seed=3,
        )
    )
    alone = [r["loss"] for r in read_jsonl(single / "metrics.jsonl") if "loss" in r]
    assert len(logged) == len(alone) == 6
    # 64 examples, 48 trained: each step's two halves are the one-process batch (the means weigh them alike)
    assert logged == pytest.approx(alone, rel=0.01)

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000006")
    (resumed / "adapter_model.safetensors").unlink()
    err = finish(torchrun(football, resumed, *flags, "--resume", "auto"))
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), err[-3000:]
    assert [r["loss"] for r in read_jsonl(resumed / "metrics.jsonl") if "loss" in r] == logged
