"""`vlmtune train`: LoRA fine-tuning, read top to bottom: setup -> an explicit Accelerate loop -> save.

The data pipeline is `pipeline.py`, the loop and its side jobs `loop.py`.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .. import tracking
from ..atomic import write_into
from ..config import TrainConfig
from ..data.stream import InStep
from ..families import Family
from ..modelcard import write_card
from ..modeling import add_lora, load_base, param_groups, pick_dtype, resolve_model, trainable_parameters
from ..rundir import (
    METRICS_FILE,
    SAMPLES_FILE,
    JsonlLog,
    write_run_config,
)
from .checkpoint import (
    CHECKPOINTS,
    LoopState,
    load_checkpoint,
    resolve_resume,
    truncate_logs,
)
from .loop import Session
from .loss import describe
from .pipeline import batches, load_data, process
from .preflight import validate_against_model, validate_engine, validate_train


def train(cfg: TrainConfig) -> Path:
    """Fine-tune `cfg.model` with LoRA on `cfg.data`; returns the run directory."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    validate_train(cfg)  # every config problem at once, before any weights are loaded
    run = Path(cfg.output)
    resume_from = resolve_resume(run, cfg.resume) if cfg.resume else None
    if process().is_main_process:
        _prepare_run_dir(run, resumed=resume_from is not None)
    process().wait_for_everyone()
    set_seed(cfg.seed)
    # Data first: a wrong path or column fails in seconds, not after minutes of loading weights.
    train_set, val_set = load_data(cfg, run)

    # The base in its half dtype under autocast, LoRA weights in fp32 (peft upcasts them): the classic AMP recipe.
    dtype = pick_dtype(cfg.dtype, process().device)
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    _forget_other_precision(mixed)
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=tracking.trackers(cfg.report_to, run, cfg.tracker_project),
        project_dir=str(run),
        # Each process reads its own batches. Accelerate's default for a stream (one process reads, then
        # dispatches) drops the loader's own generator, and the global one it falls back on is dropout's.
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False),
    )
    validate_engine(accelerator.distributed_type)
    clock = time.perf_counter()
    model, processor, family = _load_model(cfg, accelerator)
    load_s = time.perf_counter() - clock

    data = batches(cfg, run, accelerator, model, processor, family, dtype, train_set, val_set)
    if cfg.streaming and accelerator.num_processes > 1:
        # The stream already deals each process its share; Accelerate's own sharding would have every
        # process decode the whole stream and keep 1/n of it.
        data.loader = InStep(data.loader, accelerator)
    else:
        data.loader = accelerator.prepare(data.loader)  # from here on, this process's share of each epoch
    if data.per_epoch is not None:
        data.per_epoch = len(data.loader)
    total_steps = cfg.max_steps or cfg.epochs * math.ceil(data.per_epoch / cfg.grad_accum)
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA only: a few % of the tensors
    # On a GPU, one fused kernel updates every tensor at once, where the default loops over the adapter's many
    # small tensors; on the CPU the fused update measured slower (bench/RESULTS.md).
    fused = accelerator.device.type == "cuda"
    optimizer = torch.optim.AdamW(
        param_groups(model, family, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused
    )
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
    base = resolve_model(cfg.model)
    write_run_config(run, cfg, base, family.name, str(accelerator.device))
    hyperparameters = tracking.settings(cfg, base_model=base, family=family.name, processes=n)
    tracking.start(accelerator, run, hyperparameters, state.step if resume_from is not None else None)
    session = Session(
        accelerator=accelerator,
        model=model,
        processor=processor,
        family=family,
        cfg=cfg,
        dtype=dtype,
        samples=data.samples,
        frozen=family.frozen_modules(cfg.groups()),
        # One process writes the logs: every process logs the same (synchronised) steps.
        metrics=JsonlLog(run / METRICS_FILE, enabled=accelerator.is_main_process),
        sample_log=JsonlLog(run / SAMPLES_FILE, enabled=accelerator.is_main_process),
        optimizer=optimizer,
        scheduler=scheduler,
        trainable=trainable,
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

        write_into(run, write)
        write_card(run)  # in place of peft's empty template
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
        tracking.IDS_FILE,  # the trackers start new runs
        CHECKPOINTS,
        "skipped.jsonl",
    ):
        target = run / stale
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    for cache in run.glob("feature_cache*.npy"):
        cache.unlink()


def _load_model(cfg: TrainConfig, accelerator: Any) -> tuple[Any, Any, Family]:
    """The frozen base with LoRA added (and k-bit / checkpointing preparation where asked)."""
    model, processor, family = load_base(
        cfg.model, cfg.dtype, cfg.quantize, accelerator.device, lm_dropout=cfg.lm_dropout
    )
    # saved with the run's processor, so inference sizes images alike
    said = family.limit_pixels(processor, cfg.min_pixels, cfg.max_pixels)
    if said:
        accelerator.print(said)
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
        # language model is where training spends its time; the vision side runs once per image. With padded
        # shapes (--pad-to-multiple-of) each shape is compiled once, static (what CUDA graphs need); without
        # (packed rows too), torch marks the length dynamic at the second one.
        family.language_model(model).compile(
            mode=None if cfg.compile_mode == "default" else cfg.compile_mode,
            dynamic=False if cfg.padding_multiple() else None,
        )
    trainable, total = trainable_parameters(model)
    validate_against_model(replace(cfg, lora_targets=None), model, trainable, family)
    accelerator.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    accelerator.print(describe(model, family, cfg.loss_chunk))
    return model, processor, family
