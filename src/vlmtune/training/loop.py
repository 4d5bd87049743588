"""The training loop and its side jobs: logging, sample captions, validation, checkpoints, the stop on a signal."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..atomic import write_into
from ..config import TrainConfig
from ..errors import DataError, TrainingStopped
from ..families import Family, to_model
from ..modelcard import write_card
from ..rundir import (
    CONFIG_FILE,
    JsonlLog,
)
from .cache import with_features
from .checkpoint import (
    LoopState,
    complete_checkpoints,
    rng_state,
    save_checkpoint,
)
from .evaluation import caption_metrics, evaluate_loss
from .loss import training_loss
from .pipeline import Batches


@contextlib.contextmanager
def eager(module: torch.nn.Module) -> Iterator[None]:
    """`module` runs its plain forward within, even if `module.compile()` compiled it in place."""
    compiled = getattr(module, "_compiled_call_impl", None)  # what nn.Module.compile sets, and __call__ reads
    if compiled is None:
        yield
        return
    module._compiled_call_impl = None
    try:
        yield
    finally:
        module._compiled_call_impl = compiled


class StopOnSignal:
    """SIGINT / SIGTERM ask the loop to finish its step, checkpoint and stop; a second signal stops at once."""

    def __enter__(self) -> StopOnSignal:
        self.requested: str | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = signal.Signals(signum).name
        signal.signal(signum, self.previous[signum])  # the second one is not caught
        print(
            f"\n{self.requested}: finishing this step, then saving a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass(kw_only=True)
class Session:
    """The training loop and what its side jobs (logging, samples, validation, checkpoints) share."""

    accelerator: Any
    model: Any
    processor: Any
    family: Family
    cfg: TrainConfig
    dtype: torch.dtype
    samples: list[dict[str, Any]]
    frozen: list[str]
    metrics: JsonlLog
    sample_log: JsonlLog
    optimizer: Any
    scheduler: Any
    trainable: list[torch.nn.Parameter]

    def train_loop(self, state: LoopState, data: Batches, total_steps: int) -> tuple[float, int]:
        """Steps until `total_steps`: validation, checkpoints and the signal stop on the way, samples at the
        end. Returns (seconds in the loop, samples trained)."""
        cfg, accelerator = self.cfg, self.accelerator
        started, seen_before = time.perf_counter(), state.samples
        bar = tqdm(
            total=total_steps,
            initial=state.step,
            desc="train",
            unit="step",
            disable=not accelerator.is_local_main_process,
        )
        self.train_mode()
        with StopOnSignal() as stop:
            while state.step < total_steps:
                # Batches go to the processes in turn, so each process's k batches are k x processes overall.
                consumed = state.batches_in_epoch * cfg.batch_size * accelerator.num_processes
                data.order.position(state.epoch, consumed)
                ran_out = True
                for batch in data.loader:
                    state.batches_in_epoch += 1
                    finite = self.micro_step(batch, data, state)
                    if not accelerator.sync_gradients:  # mid-accumulation: not an optimizer step yet
                        continue
                    state.step += 1
                    bar.update(1)
                    self.after_step(state, finite, bar, total_steps, started, seen_before)
                    if data.val_loader is not None and cfg.eval_every and state.step % cfg.eval_every == 0:
                        self.validate(data, state, bar)
                    if cfg.save_every and state.step % cfg.save_every == 0:
                        self.save(state)
                    if self.stop_requested(stop):
                        path = self.save(state)
                        raise TrainingStopped(
                            f"stopped by {stop.requested or 'a signal to another process'} at step {state.step}; "
                            f"checkpoint {path}.\n"
                            f"Resume with the same command plus --resume auto.",
                            130,
                        )
                    if state.step >= total_steps:
                        ran_out = False
                        break
                if ran_out and state.batches_in_epoch == 0:
                    raise DataError(
                        f"split {cfg.split!r} of {cfg.data} gave no usable record (see skipped.jsonl)"
                    )
                if ran_out or state.batches_in_epoch == data.per_epoch:  # the epoch ran to its end
                    if data.val_loader is not None and not cfg.eval_every:
                        self.validate(data, state, bar)
                    state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                    self.save(state)
        bar.close()
        seconds = time.perf_counter() - started
        self.show_samples(state.step, bar)
        return seconds, state.samples - seen_before

    def micro_step(self, batch: dict[str, Any], data: Batches, state: LoopState) -> bool:
        """Forward and backward, and at the end of an accumulation the optimizer step. Whether it was finite."""
        accelerator, family = self.accelerator, self.family
        examples = batch.pop("packed_examples", None) or batch["input_ids"].shape[0]  # rows, unless packed
        with accelerator.accumulate(self.model):
            if data.features is not None:
                # Under autocast, as in the model's own forward: a trainable Q-Former may run here.
                with accelerator.autocast():
                    with_features(
                        batch, data.features, data.cache_upto, family, self.model, accelerator.device
                    )
            else:
                batch = to_model(batch, accelerator.device, self.dtype)
            loss = training_loss(self.model, family, batch, self.cfg.loss_chunk)
            accelerator.backward(loss)
            finite = True
            if accelerator.sync_gradients:
                norm = accelerator.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm or math.inf)
                finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))
            # A non-finite step changes nothing, not even the schedule; with fp16 the gradient scaler must see
            # it (it skips the update itself and lowers its scale).
            if finite or accelerator.scaler is not None:
                self.optimizer.step()
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        state.samples += examples * accelerator.num_processes
        if torch.isfinite(loss):
            state.window.append(loss.detach().float().item())
        return finite

    def train_mode(self) -> None:
        """Train mode, except in modules with nothing to train: dropout there only adds noise to features
        that never learn from it (and would make cached vision features differ from fresh ones)."""
        self.model.train()
        for name, module in self.model.named_modules():
            if name.rsplit(".", 1)[-1] in self.frozen:
                module.eval()

    def log(self, bar: Any, **record: Any) -> None:
        bar.set_postfix(
            loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.1f}"
        )
        self.metrics.write(**record)
        self.accelerator.log({"train/loss": record["loss"], "train/lr": record["lr"]}, step=record["step"])

    def after_step(
        self,
        state: LoopState,
        finite: bool,
        bar: Any,
        total: int,
        started: float,
        seen_before: int,
    ) -> None:
        """Logging, the non-finite guard and sample captions, after each optimizer step."""
        cfg = self.cfg
        if not finite:
            state.bad_steps_in_a_row += 1
            state.bad_steps_total += 1
            self.metrics.write(step=state.step, epoch=state.epoch, skipped="non-finite loss or gradient")
            bar.write(
                f"step {state.step}: non-finite loss or gradient, step skipped "
                f"({state.bad_steps_in_a_row} in a row)"
            )
            if state.bad_steps_in_a_row >= cfg.max_bad_steps:
                last = complete_checkpoints(Path(cfg.output))
                raise TrainingStopped(
                    f"step {state.step}: {state.bad_steps_in_a_row} steps in a row had a non-finite loss or "
                    f"gradient, so training stopped. Last good checkpoint: {last[-1] if last else 'none'}.\n"
                    "Usual causes: fp16 overflow (try --dtype bfloat16 or float32), a learning rate too high "
                    "(lower --lr, or raise --warmup-ratio), or a broken record in the data.",
                    3,
                )
            return
        state.bad_steps_in_a_row = 0
        if state.step % cfg.log_every == 0 or state.step == total:
            loss = self.mean_loss(state.window)
            if loss is not None:
                rate = (state.samples - seen_before) / (time.perf_counter() - started)
                lr = self.scheduler.get_last_lr()[0]
                self.log(bar, step=state.step, epoch=state.epoch, loss=loss, lr=lr, samples_per_s=rate)
            state.window = []
        if cfg.sample_every and state.step % cfg.sample_every == 0 and state.step < total:
            self.show_samples(state.step, bar)

    def stop_requested(self, stop: StopOnSignal) -> bool:
        """Whether any process got a stop signal: all must stop at the same step, or the others would wait
        forever for the next gradient exchange."""
        if self.accelerator.num_processes == 1:
            return stop.requested is not None
        flag = torch.tensor([stop.requested is not None], dtype=torch.int32, device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum").item())

    def mean_loss(self, window: list[float]) -> float | None:
        """The mean of the losses since the last log line, over every process (None if there are none)."""
        total = torch.tensor([sum(window), len(window)], dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, "sum")
        return float(total[0] / total[1]) if total[1] else None

    def save(self, state: LoopState) -> Path | None:
        """A checkpoint of `state` in RUN_DIR/checkpoints. Every process calls it at the same step: the main
        process writes the checkpoint, with every process's random generators and unlogged losses."""
        rngs = [{**rng_state(), "window": list(state.window)}]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rngs = gather_object(rngs)  # in rank order
        path = None
        if self.accelerator.is_main_process:
            path = save_checkpoint(
                Path(self.cfg.output),
                self.accelerator.unwrap_model(self.model),
                self.optimizer,
                self.scheduler,
                self.accelerator.scaler,
                state,
                self.cfg.keep,
                rngs,
            )
            # TensorBoard buffers its events: they are made as durable as the checkpoint, so a run killed
            # after it shows no gap once resumed.
            if any(t.name == "tensorboard" for t in self.accelerator.trackers):
                self.accelerator.get_tracker("tensorboard", unwrap=True).flush()
        # No process goes on before the checkpoint is written: after a stop signal the others would exit, and
        # the launcher ends the whole group when one process exits, the writer with it.
        self.accelerator.wait_for_everyone()
        return path

    def validate(self, data: Batches, state: LoopState, bar: Any) -> None:
        """Validation loss (and caption metrics with --eval-metrics); the best adapter so far to RUN_DIR/best."""
        inner = self.accelerator.unwrap_model(self.model)  # no DDP: processes may run unequal batch counts
        with self.accelerator.autocast():
            loss = evaluate_loss(
                inner,
                self.family,
                data.val_loader,
                self.dtype,
                self.accelerator,
                data.val_features,
                data.cache_upto,
                self.cfg.loss_chunk,
            )
        record: dict[str, float] = {"val_loss": loss}
        if self.cfg.eval_metrics:
            record.update(
                caption_metrics(
                    self.accelerator, inner, self.generate, data.val_examples, self.cfg.batch_size
                )
            )
        self.metrics.write(step=state.step, epoch=state.epoch, **record)
        self.accelerator.log({f"val/{k}": v for k, v in record.items()}, step=state.step)
        bar.write(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items()))
        value, lower_wins = record[self.cfg.best_metric], self.cfg.best_metric == "val_loss"
        if state.best is None or (value < state.best if lower_wins else value > state.best):
            state.best = value
            self.save_best(state, record)
        self.train_mode()

    def save_best(self, state: LoopState, record: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        best = Path(self.cfg.output) / "best"
        best.mkdir(exist_ok=True)
        adapter = self.accelerator.unwrap_model(self.model)

        def write(tmp: Path) -> None:
            adapter.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)
            shutil.copy(best.parent / CONFIG_FILE, tmp / CONFIG_FILE)  # so `--run RUN_DIR/best` works too
            (tmp / "best.json").write_text(
                json.dumps(
                    {"step": state.step, "epoch": state.epoch, "metric": self.cfg.best_metric, **record},
                    indent=2,
                )
            )

        write_into(best, write)
        write_card(best)

    def generate(self, inner: Any, examples: list[dict[str, Any]]) -> list[str]:
        batch = self.family.generation_inputs(
            self.processor,
            [x["images"] for x in examples],
            [x["prompt"] for x in examples],
            self.accelerator.device,
            self.dtype,
            max_length=self.cfg.max_length,
            history=[x["history"] for x in examples],
            turn_images=[x["turn_images"] for x in examples],
        )
        # generate() bypasses the prepared forward and its autocast; k-bit preparation leaves some weights fp32.
        # A compiled language model generates eagerly: each decoding length would compile again.
        with self.accelerator.autocast(), eager(self.family.language_model(inner)):
            return self.family.generate(inner, self.processor, batch, max_new_tokens=self.cfg.max_length)

    def show_samples(self, step: int, bar: Any) -> None:
        if not self.samples or not self.accelerator.is_main_process:
            return
        inner = self.accelerator.unwrap_model(self.model)
        inner.eval()
        for x, g in zip(self.samples, self.generate(inner, self.samples), strict=True):
            bar.write(f"step {step} sample: {g!r}  (reference: {x['target']!r})")
            self.sample_log.write(step=step, caption=g, reference=x["target"])
        self.train_mode()
