"""`vlmtune train`: LoRA fine-tuning, read top to bottom: setup -> an explicit Accelerate loop -> save."""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .cache import kept_features, wants_cache
from .checkpoint import (
    CHECKPOINTS,
    LoopState,
    complete_checkpoints,
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    truncate_logs,
)
from .config import TrainConfig, validate_against_model, validate_train
from .data import (
    CaptionExamples,
    Collator,
    DataError,
    EpochSampler,
    Prompting,
    detect,
    held_out_rows,
    load_splits,
)
from .datacheck import bad_as_dicts, bad_report, find_bad_records
from .families import IGNORE_INDEX, Family, to_model
from .modeling import add_lora, load_base, pick_dtype, resolve_model, trainable_parameters
from .rundir import (
    CONFIG_FILE,
    METRICS_FILE,
    SAMPLES_FILE,
    JsonlLog,
    atomic_write_text,
    save_atomically,
    write_run_config,
)


class TrainingStopped(RuntimeError):
    """Training ended before its last step, on purpose: a signal, or too many non-finite steps in a row.

    The message says where it stopped and how to go on; `exit_code` is what the CLI exits with.
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def train(cfg: TrainConfig) -> Path:
    """Fine-tune `cfg.model` with LoRA on `cfg.data`; returns the run directory."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    validate_train(cfg)  # every config problem at once, before any weights are loaded
    run = Path(cfg.output)
    resume_from = resolve_resume(run, cfg.resume) if cfg.resume else None
    if _process().is_main_process:
        _prepare_run_dir(run, resumed=resume_from is not None)
    _process().wait_for_everyone()
    set_seed(cfg.seed)
    # Data first: a wrong path or column fails in seconds, not after minutes of loading weights.
    train_set, val_set = _load_data(cfg, run)

    # The base in its half dtype under autocast, LoRA weights in fp32 (peft upcasts them): the classic AMP recipe.
    dtype = pick_dtype(cfg.dtype, _process().device)
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    _forget_other_precision(mixed)
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard",
        project_dir=str(run),
        # Each process reads its own batches. Accelerate's default for a stream (one process reads, then
        # dispatches) drops the loader's own generator, and the global one it falls back on is dropout's.
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False),
    )
    clock = time.perf_counter()
    model, processor, family = _load_model(cfg, accelerator)
    load_s = time.perf_counter() - clock

    data = _batches(cfg, run, accelerator, model, processor, family, dtype, train_set, val_set)
    data.loader = accelerator.prepare(data.loader)  # from here on, this process's share of each epoch
    if data.per_epoch is not None:
        data.per_epoch = len(data.loader)
    total_steps = cfg.max_steps or cfg.epochs * math.ceil(data.per_epoch / cfg.grad_accum)
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA only: a few % of the tensors
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Accelerate advances a prepared schedule once per process at every optimizer step (it expects one sized
    # for a single process seeing all the batches), so it is sized that way.
    n = accelerator.num_processes
    scheduler = get_scheduler(
        cfg.scheduler,
        optimizer,
        num_warmup_steps=int(cfg.warmup_ratio * total_steps) * n,
        num_training_steps=total_steps * n,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    state = LoopState()
    if resume_from is not None:
        state = load_checkpoint(
            resume_from,
            accelerator.unwrap_model(model),
            optimizer,
            scheduler,
            accelerator.scaler,
            accelerator.process_index,
        )
        truncate_logs(run, state.step)  # steps logged after the checkpoint are about to be done again
        accelerator.print(f"resuming from {resume_from} (step {state.step}, epoch {state.epoch})")
    write_run_config(run, cfg, resolve_model(cfg.model), family.name, str(accelerator.device))
    # A resumed run does again the steps after its checkpoint: TensorBoard drops what it logged for them before.
    purge = {"tensorboard": {"purge_step": state.step + 1}} if resume_from is not None else {}
    accelerator.init_trackers("tensorboard", init_kwargs=purge)
    session = _Session(
        accelerator,
        model,
        processor,
        family,
        cfg,
        dtype,
        data.samples,
        family.frozen_modules(cfg.groups()),
        # One process writes the logs: every process logs the same (synchronised) steps.
        JsonlLog(run / METRICS_FILE, enabled=accelerator.is_main_process),
        JsonlLog(run / SAMPLES_FILE, enabled=accelerator.is_main_process),
        optimizer,
        scheduler,
        trainable,
    )

    loop_s, trained = session.train_loop(state, data, total_steps)
    # Where the time went, for benchmarks and for the user: load, one-off feature cache, the loop itself.
    session.metrics.write(
        step=state.step,
        train_samples=trained,
        load_s=load_s,
        cache_s=data.cache_s,
        loop_s=loop_s,
        skipped_steps=state.bad_steps_total,
    )

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        adapter = accelerator.unwrap_model(model)

        def write(tmp: Path) -> None:
            adapter.save_pretrained(tmp)
            processor.save_pretrained(tmp)

        save_atomically(run, write)
    # Every process returns once the adapter is written, and they take the process group down together.
    accelerator.wait_for_everyone()
    # The DDP wrapper goes before the process group. Its reducer holds the group too, and had it dropped the
    # last reference, the group's destructor would join gloo's threads while holding the GIL, which one of them
    # may still need to free a tensor of the last collective: a hang at exit (1 run in ~30, seen in CI).
    # Destroyed through its own Python handle, the group releases the GIL first.
    del model, session, optimizer, scheduler
    accelerator.free_memory()
    accelerator.end_training()
    accelerator.print(f"run directory: {run}")
    return run


@dataclass
class _Batches:
    """The training and validation data as the loop consumes them."""

    loader: DataLoader
    order: Any  # what is told where each epoch starts: the EpochSampler, or the stream itself
    per_epoch: (
        int | None
    )  # this process's batches per epoch; None for a stream (its epoch ends when it runs out)
    features: Any  # the image-feature cache, or None
    cache_upto: str | None  # what the cache holds: the image path up to "projection" or up to "vision"
    val_loader: DataLoader | None
    val_features: Any  # the validation split's image-feature cache, or None
    val_examples: Any
    samples: list[dict[str, Any]]  # fixed examples captioned as training goes
    cache_s: float  # seconds spent filling the feature cache


def _batches(
    cfg: TrainConfig,
    run: Path,
    accelerator: Any,
    model: Any,
    processor: Any,
    family: Family,
    dtype: torch.dtype,
    train_set: Any,
    val_set: Any,
) -> _Batches:
    """Examples, the feature cache when the vision side is frozen, the epoch order and the loaders."""
    collate = Collator(family, processor, cfg.max_length)
    prompt = family.caption_prompt if cfg.prompt is None else cfg.prompt
    prompting = Prompting(prompt, cfg.question_column, family.question_template)
    if cfg.streaming:
        from .stream import BadRecordLog, StreamExamples

        examples = StreamExamples(
            train_set,
            cfg.image_column,
            cfg.text_column,
            prompting,
            cfg.seed,
            cfg.shuffle_buffer,
            # every process reads the whole stream, so one of them reports
            on_bad=BadRecordLog(run / "skipped.jsonl", cfg.split) if accelerator.is_main_process else None,
            batch_size=cfg.batch_size,
        )
    else:
        examples = CaptionExamples(train_set, cfg.image_column, cfg.text_column, prompting)
    features, val_features, train_items, train_collate, cache_s = None, None, examples, collate, 0.0
    upto, why = wants_cache(cfg, family, model)
    accelerator.print(f"image feature cache: {'on' if upto else 'off'} ({why})")

    def cached(split: Any, name: str, spill_name: str) -> Any:
        """The image features of a split's rows, computed, or read where --feature-cache-dir kept them."""
        rows = CaptionExamples(split, cfg.image_column, cfg.text_column, prompting, per_image=True)
        found, kept = kept_features(
            model,
            family,
            collate,
            rows,
            dtype=dtype,
            accelerator=accelerator,
            keep_dir=Path(cfg.feature_cache_dir) if cfg.feature_cache_dir else None,
            upto=upto,
            batch_size=4 * cfg.batch_size,
            num_workers=cfg.num_workers,
            spill_dir=run,
            spill_name=spill_name,
        )
        if kept:
            accelerator.print(f"{name} image features: {kept}")
        return found

    if upto:
        clock = time.perf_counter()
        features = cached(train_set, "training", "feature_cache")
        if val_set is not None:  # validation then costs a language-model forward per example, no more
            val_features = cached(val_set, "validation", "feature_cache.val")
        cache_s = time.perf_counter() - clock
        train_items = examples.without_images()
        train_collate = Collator(family, processor, cfg.max_length, cached=True)
    # The data order is a function of (seed, epoch) alone, so a resumed run sees the same batches.
    sampler = None
    if not cfg.streaming:
        sampler = EpochSampler(
            len(train_items),
            cfg.seed,
            groups=examples.groups() if cfg.captions_per_epoch == "one" else None,
            lengths=examples.target_lengths() if cfg.group_by_length else None,
            batch_size=cfg.batch_size,
        )
    workers = train_items.workers(cfg.num_workers) if cfg.streaming else cfg.num_workers
    if workers < cfg.num_workers:
        accelerator.print(
            f"--num-workers {cfg.num_workers}: the stream has {workers} shard(s), so {workers} worker(s)"
        )
    # Its own generator too: each new iterator draws a seed, which must not come from the global generator
    # that dropout uses (a resumed run would then be one draw off).
    loader = DataLoader(
        train_items,
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=train_collate,
        num_workers=workers,
        pin_memory=accelerator.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    val_examples, val_loader = None, None
    if val_set is not None:
        val_examples = CaptionExamples(val_set, cfg.image_column, cfg.text_column, prompting)
        # Each process scores every n-th example; the sums are added up across processes (a prepared loader
        # would pad the last batches with repeated examples, which would count twice).
        share = range(accelerator.process_index, len(val_examples), accelerator.num_processes)
        cached_val = val_features is not None
        val_loader = DataLoader(
            Subset(val_examples.without_images() if cached_val else val_examples, share),
            batch_size=cfg.batch_size,
            collate_fn=train_collate if cached_val else collate,
            num_workers=cfg.num_workers,
        )
    # Fixed images captioned as training goes.
    if val_examples is not None:
        samples = [val_examples[i] for i in range(min(cfg.num_samples, len(val_examples)))]
    elif cfg.streaming:
        samples = examples.head(cfg.num_samples)
    else:
        samples = [examples[i] for i in range(min(cfg.num_samples, len(examples)))]

    return _Batches(
        loader,
        sampler or train_items,
        None if cfg.streaming else len(loader),
        features,
        upto,
        val_loader,
        val_features,
        val_examples,
        samples,
        cache_s,
    )


def _load_data(cfg: TrainConfig, run: Path) -> tuple[Any, Any]:
    """(train split, validation split or None), checked; the split written to RUN_DIR/split.json. With
    --streaming the train split is a `datasets.IterableDataset` (and the validation split, small by nature,
    is read in full)."""
    columns = (cfg.image_column, cfg.text_column) + ((cfg.question_column,) if cfg.question_column else ())
    if _process().is_main_process:
        print(f"data: {cfg.data} ({detect(cfg.data)[0]}{', streaming' if cfg.streaming else ''})")
    split_doc: dict[str, Any] = {
        "data": cfg.data,
        "split": cfg.split,
        "val_split": cfg.val_split,
        "seed": cfg.seed,
    }
    if cfg.streaming:
        import datasets

        from .stream import load_stream

        train_set, val_set = load_stream(cfg.data, cfg.split, columns, cfg.image_root), None
        if cfg.val_split:
            stream = load_stream(cfg.data, cfg.val_split, columns, cfg.image_root)
            val_set = datasets.Dataset.from_generator(lambda: (yield from stream), features=stream.features)
        split_doc.update(streaming=True, shuffle_buffer=cfg.shuffle_buffer)
    else:
        train_set, val_set = load_splits(
            cfg.data, cfg.split, cfg.val_split, cfg.val_fraction, columns, cfg.seed, cfg.image_root
        )
        split_doc.update(train_rows=len(train_set), val_fraction=cfg.val_fraction)
        if cfg.val_fraction:
            split_doc["val_rows_of_split"] = held_out_rows(
                len(train_set) + len(val_set), cfg.val_fraction, cfg.seed
            )
    atomic_write_text(run / "split.json", json.dumps(split_doc) + "\n")
    # Every record is checked now, so a bad one stops nothing halfway through an epoch (a stream's records
    # are checked as they come).
    if not cfg.streaming:
        train_set = _drop_bad(train_set, cfg, run, cfg.split)
    if val_set is not None:
        val_set = _drop_bad(val_set, cfg, run, cfg.val_split or "validation")
    return train_set, val_set


def _process() -> Any:
    """This process's place in the run (rank, device), as the Accelerator will see it. Asked before the
    Accelerator exists, so it must read `ACCELERATE_USE_CPU` as the Accelerator does: processes started by
    torchrun on CPUs would otherwise each take themselves for the only one."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _drop_bad(dataset: Any, cfg: TrainConfig, run: Path, split: str) -> Any:
    """`dataset` without its bad records with --skip-bad (listed in skipped.jsonl); otherwise an error naming all."""
    bad = find_bad_records(dataset, cfg.image_column, cfg.text_column)
    if not bad:
        return dataset
    if not cfg.skip_bad:
        raise DataError(bad_report(cfg.data, split, bad))
    log = JsonlLog(run / "skipped.jsonl", enabled=_process().is_main_process)
    for record in bad_as_dicts(bad):
        log.write(split=split, **record)
    rows = {b.row for b in bad}
    print(
        f"--skip-bad: {len(rows)} bad record(s) of split {split!r} left out, listed in {run / 'skipped.jsonl'}"
    )
    return dataset.select([i for i in range(len(dataset)) if i not in rows])


def _forget_other_precision(mixed: str) -> None:
    """Accelerate keeps one process-wide state; a second `train()` in the same process with another precision
    (the Python API, a notebook) would otherwise be refused. The process-level (distributed) state is kept."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed:
        AcceleratorState._reset_state()


def _prepare_run_dir(run: Path, resumed: bool) -> None:
    run.mkdir(parents=True, exist_ok=True)
    if resumed:
        return
    # An earlier run's logs and checkpoints (reachable only with --overwrite) would mix with this one's. Its
    # adapter stays until this run saves a new one.
    for stale in (
        METRICS_FILE,
        SAMPLES_FILE,
        "tensorboard",
        CHECKPOINTS,
        "skipped.jsonl",
    ):
        target = run / stale
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    for cache in run.glob("feature_cache*.npy"):
        cache.unlink()


class _StopOnSignal:
    """SIGINT / SIGTERM ask the loop to finish its step, checkpoint and stop; a second signal stops at once."""

    def __enter__(self) -> _StopOnSignal:
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


def _load_model(cfg: TrainConfig, accelerator: Any) -> tuple[Any, Any, Family]:
    """The frozen base with LoRA added (and k-bit / checkpointing preparation where asked)."""
    model, processor, family = load_base(cfg.model, cfg.dtype, cfg.quantize, accelerator.device)
    if cfg.quantize != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.gradient_checkpointing:
        # Non-reentrant checkpointing passes gradients to LoRA weights even though every input is frozen.
        lm, kwargs = family.language_model(model), {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):  # the name since transformers 5.24
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if cfg.lora_targets:  # peft's own error for an unmatched regex names nothing useful
        validate_against_model(cfg, model, 0)
    model = add_lora(model, family, cfg)
    if cfg.compile:
        # In place (nn.Module.compile): parameter names, and so the saved adapter, stay as they are. The
        # language model is where training spends its time; the vision side runs once per image.
        family.language_model(model).compile()
    trainable, total = trainable_parameters(model)
    validate_against_model(replace(cfg, lora_targets=None), model, trainable)
    accelerator.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    return model, processor, family


@dataclass
class _Session:
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

    def train_loop(self, state: LoopState, data: _Batches, total_steps: int) -> tuple[float, int]:
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
        with _StopOnSignal() as stop:
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

    def micro_step(self, batch: dict[str, Any], data: _Batches, state: LoopState) -> bool:
        """Forward and backward, and at the end of an accumulation the optimizer step. Whether it was finite."""
        accelerator, family = self.accelerator, self.family
        with accelerator.accumulate(self.model):
            if data.features is not None:
                # Under autocast, as in the model's own forward: a trainable Q-Former may run here.
                with accelerator.autocast():
                    with_features(
                        batch, data.features, data.cache_upto, family, self.model, accelerator.device
                    )
            else:
                batch = to_model(batch, accelerator.device, self.dtype)
            loss = self.model(**family.loss_inputs(batch)).loss
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
        state.samples += batch["input_ids"].shape[0] * accelerator.num_processes
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

    def stop_requested(self, stop: _StopOnSignal) -> bool:
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
            self.accelerator.get_tracker("tensorboard", unwrap=True).flush()
        # No process goes on before the checkpoint is written: after a stop signal the others would exit, and
        # the launcher ends the whole group when one process exits, the writer with it.
        self.accelerator.wait_for_everyone()
        return path

    def validate(self, data: _Batches, state: LoopState, bar: Any) -> None:
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
            )
        record: dict[str, float] = {"val_loss": loss}
        if self.cfg.eval_metrics:
            record.update(self.caption_metrics(data.val_examples))
        self.metrics.write(step=state.step, epoch=state.epoch, **record)
        self.accelerator.log({f"val/{k}": v for k, v in record.items()}, step=state.step)
        bar.write(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items()))
        value, lower_wins = record[self.cfg.best_metric], self.cfg.best_metric == "val_loss"
        if state.best is None or (value < state.best if lower_wins else value > state.best):
            state.best = value
            self.save_best(state, record)
        self.train_mode()

    @torch.no_grad()
    def caption_metrics(self, examples: Any) -> dict[str, float]:
        """Caption metrics of the validation examples: each process captions every n-th one, the main process
        scores them all, and every process gets the scores (they must agree on which adapter is best)."""
        from accelerate.utils import broadcast_object_list, gather_object

        from .metrics import caption_scores

        accelerator, size = self.accelerator, self.cfg.batch_size
        inner = accelerator.unwrap_model(self.model)
        inner.eval()
        mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
        got: list[tuple[int, str]] = []
        for start in range(0, len(mine), size):
            chunk = mine[start : start + size]
            got += zip(chunk, self.generate(inner, [examples[i] for i in chunk]), strict=True)
        if accelerator.num_processes > 1:
            got = gather_object(got)
        scores = [None]
        if accelerator.is_main_process:
            captions = dict(got)
            refs = {str(i): [examples[i]["target"]] for i in range(len(examples))}
            scores = [caption_scores({str(i): captions[i] for i in range(len(examples))}, refs)["scores"]]
        if accelerator.num_processes > 1:
            broadcast_object_list(scores)
        return scores[0]

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

        save_atomically(best, write)

    def generate(self, inner: Any, examples: list[dict[str, Any]]) -> list[str]:
        batch = self.family.generation_inputs(
            self.processor,
            [x["image"] for x in examples],
            [x["prompt"] for x in examples],
            self.accelerator.device,
            self.dtype,
            max_length=self.cfg.max_length,
        )
        # generate() bypasses the prepared forward and its autocast; k-bit preparation leaves some weights fp32.
        with self.accelerator.autocast():
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


@torch.no_grad()
@torch.no_grad()
def evaluate_loss(
    model: Any,
    family: Family,
    loader: DataLoader,
    dtype: torch.dtype,
    accelerator: Any,
    features: Any = None,
    upto: str | None = None,
) -> float:
    """Mean loss over `loader` (this process's share), weighted by each batch's number of target tokens and
    summed over every process; with `features`, the loader's batches carry image indices into them. Leaves
    `model` in eval mode."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (loss x tokens, tokens)
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        if features is not None:
            with_features(batch, features, upto, family, model, accelerator.device)
        else:
            batch = to_model(batch, accelerator.device, dtype)
        n = (batch["labels"] != IGNORE_INDEX).sum()  # each target token is scored once, in every family
        total += torch.stack([model(**family.loss_inputs(batch)).loss.double() * n, n.double()])
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, "sum")
    return float(total[0] / total[1].clamp(min=1))


def with_features(
    batch: dict[str, Any], features: Any, upto: str | None, family: Family, model: Any, device: torch.device
) -> dict[str, Any]:
    """`batch` with its images' cached features in place of pixels: (B,) row indices -> forward() arguments."""
    index = batch.pop("image_index").to(features.device)
    batch.update(family.cached_inputs(features[index].to(device, non_blocking=True), model, upto, batch))
    return batch
