"""Runs that survive: kill -9 and resume gives the same adapter bit for bit; Ctrl-C checkpoints and says how to
resume; non-finite steps are skipped and reported; a checkpoint write that dies leaves the previous one usable."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlmtune.training.loop as loop
import vlmtune.training.run as finetune
from vlmtune.cli import main
from vlmtune.config import TrainConfig
from vlmtune.rundir import read_jsonl
from vlmtune.training.checkpoint import complete_checkpoints, resolve_resume

pytestmark = pytest.mark.slow

# 240 images / batch 4 = 60 steps an epoch; checkpoints every 25 steps land mid-epoch. LoRA dropout stays on,
# so the resumed run must also restore the random generator to match.
ARGS = [
    "--model",
    "tiny",
    "--batch-size",
    "4",
    "--epochs",
    "4",
    "--lr",
    "3e-3",
    "--save-every",
    "25",
    "--sample-every",
    "0",
    "--num-samples",
    "0",
    "--log-every",
    "5",
    "--lora-dropout",
    "0.1",
    "--seed",
    "7",
]


def cli(football, out, *extra):
    return [sys.executable, "-m", "vlmtune", "train", "--data", football, "--output", str(out), *ARGS, *extra]


def start(cmd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_checkpoint(run: Path, step: int, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(int(p.name.split("-")[1]) >= step for p in complete_checkpoints(run)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint at step {step} in {run}")


def tensorboard_scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar as TensorBoard shows it, every events file of the directory read."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def adapter(run):
    return load_file(str(Path(run) / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(football, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(cli(football, run), check=True, capture_output=True)
    return run


def test_sigkill_then_resume_gives_the_same_adapter_bitwise(football, uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = start(cli(football, run))
    wait_for_checkpoint(run, 50, proc)  # mid-epoch 0 (step 50 of 60) or later
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "adapter_model.safetensors").exists()
    killed_at = int(complete_checkpoints(run)[-1].name.split("-")[1])
    assert killed_at < 240

    done = subprocess.run(cli(football, run, "--resume", "auto"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming from {run / 'checkpoints'}" in done.stdout

    a, b = adapter(uninterrupted), adapter(run)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed adapter differs from the uninterrupted one"
    # The loss log goes on without a gap or a repeated step, and matches the uninterrupted run's.
    logged = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logged] == list(range(5, 241, 5))
    straight = [r for r in read_jsonl(uninterrupted / "metrics.jsonl") if "loss" in r]
    assert [r["loss"] for r in logged] == [r["loss"] for r in straight]
    assert len(complete_checkpoints(run)) == 2  # --keep 2


def test_sigint_checkpoints_and_says_how_to_resume(football, uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = start(cli(football, run))
    wait_for_checkpoint(run, 25, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGINT: finishing this step, then saving a checkpoint" in err
    assert "--resume auto" in err and "Traceback" not in err
    stopped = complete_checkpoints(run)[-1]
    assert f"checkpoint {stopped}" in err
    assert not (run / "adapter_model.safetensors").exists()
    assert subprocess.run(cli(football, run, "--resume", "auto"), capture_output=True).returncode == 0
    a, b = adapter(uninterrupted), adapter(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tensorboard_shows_each_step_once_after_a_resume(football, tmp_path, monkeypatch):
    """A run dies after TensorBoard wrote steps past its last checkpoint; resumed, it shows each step once."""
    settings = dict(model="tiny", data=football, output=str(tmp_path / "run"), batch_size=4, max_steps=40)
    settings |= dict(save_every=20, log_every=1, sample_every=0, num_samples=0, lr=3e-3)
    after_step = loop.Session.after_step

    def dies_at_step_35(self, state, *args, **kwargs):
        after_step(self, state, *args, **kwargs)
        if state.step == 35:
            raise RuntimeError("killed")

    monkeypatch.setattr(loop.Session, "after_step", dies_at_step_35)
    with pytest.raises(RuntimeError, match="killed"):
        finetune.train(TrainConfig(**settings))
    monkeypatch.undo()
    logdir = tmp_path / "run" / "tensorboard"
    # TensorBoard writes events in tens: the dead run's reached disk up to step 30, past its checkpoint at 20.
    assert max(step for step, _ in tensorboard_scalars(logdir, "train/loss")) > 20

    finetune.train(TrainConfig(**settings, resume="auto"))
    shown = tensorboard_scalars(logdir, "train/loss")
    assert [step for step, _ in shown] == list(range(1, 41))
    logged = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [v for _, v in shown] == pytest.approx(logged)  # the resumed run's values, as in metrics.jsonl


def poison(monkeypatch, which):
    """Make the cached features of some images NaN, as a corrupt record or an fp16 overflow would."""
    import vlmtune.training.cache as cache

    real = cache.build_feature_cache

    def build(*args, **kwargs):
        features = real(*args, **kwargs)
        features[which] = float("nan")
        return features

    monkeypatch.setattr(cache, "build_feature_cache", build)


def test_non_finite_steps_are_skipped_and_reported(football, tmp_path, monkeypatch, capsys):
    poison(monkeypatch, [3])
    cfg = TrainConfig(
        model="tiny",
        data=football,
        output=str(tmp_path / "run"),
        batch_size=4,
        epochs=2,
        sample_every=0,
        num_samples=0,
        lr=3e-3,
    )
    run = finetune.train(cfg)
    records = read_jsonl(run / "metrics.jsonl")
    skipped = [r for r in records if "skipped" in r]
    assert len(skipped) == 2  # image 3 is in one batch per epoch
    assert records[-1]["skipped_steps"] == 2
    assert "non-finite loss or gradient, step skipped" in capsys.readouterr().out
    assert all(torch.isfinite(v).all() for v in adapter(run).values())
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r)  # no NaN in the log


def test_too_many_non_finite_steps_stop_with_a_reason(football, tmp_path, monkeypatch, capsys):
    poison(monkeypatch, slice(None))
    code = main(
        [
            "train",
            "--model",
            "tiny",
            "--data",
            football,
            "--output",
            str(tmp_path / "run"),
            "--batch-size",
            "4",
            "--max-bad-steps",
            "3",
            "--sample-every",
            "0",
            "--num-samples",
            "0",
        ]
    )
    err = capsys.readouterr().err
    assert code == 3
    assert "step 3: 3 steps in a row had a non-finite loss or gradient" in err
    assert "Last good checkpoint: none" in err and "fp16 overflow" in err and "--lr" in err


def test_a_checkpoint_write_that_dies_leaves_the_previous_one(football, tmp_path, monkeypatch):
    import vlmtune.training.checkpoint as checkpoint

    cfg = TrainConfig(
        model="tiny",
        data=football,
        output=str(tmp_path / "run"),
        batch_size=4,
        max_steps=20,
        save_every=10,
        sample_every=0,
        num_samples=0,
    )
    real_save, optimizer_saves = torch.save, []

    def dying_save(obj, path, *a, **k):
        if str(path).endswith("optimizer.pt"):
            optimizer_saves.append(path)
            if len(optimizer_saves) == 2:  # halfway through the second checkpoint
                raise OSError("No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(OSError, match="No space left"):
        finetune.train(cfg)
    run = Path(cfg.output)
    assert [p.name for p in complete_checkpoints(run)] == ["step-00000010"]
    assert resolve_resume(run, "auto").name == "step-00000010"
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    # The survivor loads, and a resumed run goes on from it.
    finetune.train(TrainConfig(**{**cfg.__dict__, "resume": "auto"}))
    assert [p.name for p in complete_checkpoints(run)][-1] == "step-00000020"
    assert (run / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "args, says",
    [
        (["--keep", "0"], "--keep must be at least 1"),
        (["--save-every", "-1"], "--save-every must be 0 or more"),
        (["--resume", "auto"], "holds no complete checkpoint"),
        (["--resume", "auto", "--overwrite"], "give --resume or --overwrite, not both"),
        (["--dtype", "float16"], "--dtype float16 needs a CUDA GPU"),
        (["--lora-targets", r".*language_model.*\.(q_projj)"], "Did you mean 'q_proj'?"),
        (["--model", "no-such-org/no-such-model"], "--model: cannot load model 'no-such-org/no-such-model'"),
        (["--feature-cache-dir", __file__ + "/features"], f"{__file__} is not a writable directory"),
    ],
)
def test_configuration_errors_name_the_problem(football, tmp_path, capsys, args, says):
    if "float16" in args and torch.cuda.is_available():
        pytest.skip("fp16 is fine on a GPU")
    code = main(
        [
            "train",
            "--model",
            "tiny",
            "--data",
            football,
            "--output",
            str(tmp_path / "run"),
            "--max-steps",
            "1",
            *args,
        ]
    )
    assert code == 2
    assert says in capsys.readouterr().err
