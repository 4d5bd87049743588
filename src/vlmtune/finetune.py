"""`vlmtune train`: LoRA fine-tuning, read top to bottom: setup -> an explicit Accelerate loop -> save."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .cache import build_feature_cache, wants_cache
from .config import TrainConfig, validate_train
from .data import CaptionExamples, Collator, TextOnlyExamples, column_values, load_splits
from .families import IGNORE_INDEX, Family
from .modeling import add_lora, load_base, pick_dtype, resolve_model, trainable_parameters
from .rundir import METRICS_FILE, SAMPLES_FILE, JsonlLog, save_atomically, write_run_config


def train(cfg: TrainConfig) -> Path:
    """Fine-tune `cfg.model` with LoRA on `cfg.data`; returns the run directory."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    validate_train(cfg)  # every config problem at once, before any weights are loaded
    run = _prepare_run_dir(Path(cfg.output))
    set_seed(cfg.seed)
    # Data first: a wrong path or column fails in seconds, not after minutes of loading weights.
    columns = (cfg.image_column, cfg.text_column)
    train_set, val_set = load_splits(cfg.data, cfg.split, cfg.val_split, cfg.val_fraction, columns, cfg.seed)

    # The base in its half dtype under autocast, LoRA weights in fp32 (peft upcasts them): the classic AMP recipe.
    dtype = pick_dtype(cfg.dtype, PartialState().device)
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard",
        project_dir=str(run),
    )
    clock = time.perf_counter()
    model, processor, family = _load_model(cfg, accelerator)
    load_s = time.perf_counter() - clock

    collate = Collator(family, processor, cfg.max_length)
    examples = CaptionExamples(train_set, cfg.image_column, cfg.text_column, cfg.prompt)
    features, train_items, train_collate, cache_s = None, examples, collate, 0.0
    use_cache, why = wants_cache(cfg, family, model)
    accelerator.print(f"image feature cache: {'on' if use_cache else 'off'} ({why})")
    if use_cache:
        clock = time.perf_counter()
        features = build_feature_cache(
            model,
            family,
            collate,
            examples,
            dtype=dtype,
            accelerator=accelerator,
            batch_size=4 * cfg.batch_size,
            num_workers=cfg.num_workers,
        )
        cache_s = time.perf_counter() - clock
        train_items = TextOnlyExamples(column_values(train_set, cfg.text_column), cfg.prompt)
        train_collate = Collator(family, processor, cfg.max_length, cached=True)
    loader = DataLoader(
        train_items,
        batch_size=cfg.batch_size,
        shuffle=True,
        collate_fn=train_collate,
        num_workers=cfg.num_workers,
        pin_memory=accelerator.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    val_examples, val_loader = None, None
    if val_set is not None:
        val_examples = CaptionExamples(val_set, cfg.image_column, cfg.text_column, cfg.prompt)
        val_loader = DataLoader(
            val_examples, batch_size=cfg.batch_size, collate_fn=collate, num_workers=cfg.num_workers
        )
    shown = val_examples if val_examples is not None else examples  # fixed images captioned as training goes
    samples = [shown[i] for i in range(min(cfg.num_samples, len(shown)))]

    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA only: a few % of the tensors
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        cfg.scheduler,
        optimizer,
        num_warmup_steps=int(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)

    write_run_config(run, cfg, resolve_model(cfg.model), family.name, str(accelerator.device))
    accelerator.init_trackers("tensorboard")
    session = _Session(
        accelerator,
        model,
        processor,
        family,
        cfg,
        dtype,
        samples,
        family.frozen_modules(cfg.train_qformer, cfg.train_projection),
        JsonlLog(run / METRICS_FILE),
        JsonlLog(run / SAMPLES_FILE),
    )

    step, seen, window = 0, 0, []
    started = time.perf_counter()
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not accelerator.is_local_main_process)
    session.train_mode()
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        for batch in loader:
            if features is not None:  # (B,) indices -> (B, num_query_tokens, d_lm) features
                index = batch.pop("image_index").to(features.device)
                batch.update(family.cached_inputs(features[index].to(accelerator.device, non_blocking=True)))
            else:
                batch["pixel_values"] = batch["pixel_values"].to(dtype)
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            seen += batch["input_ids"].shape[0] * accelerator.num_processes
            window.append(loss.detach().float().item())
            if not accelerator.sync_gradients:  # mid-accumulation: not an optimizer step yet
                continue
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                rate = seen / (time.perf_counter() - started)
                session.log(
                    bar,
                    step=step,
                    epoch=epoch,
                    loss=sum(window) / len(window),
                    lr=scheduler.get_last_lr()[0],
                    samples_per_s=rate,
                )
                window = []
            if cfg.sample_every and step % cfg.sample_every == 0 and step < total_steps:
                session.show_samples(step, bar)
            if step >= total_steps:
                break
        if val_loader is not None:
            session.validate(val_loader, step, epoch, bar)
        if step >= total_steps:
            break
    bar.close()
    loop_s = time.perf_counter() - started
    session.show_samples(step, bar)
    # Where the time went, for benchmarks and for the user: load, one-off feature cache, the loop itself.
    session.metrics.write(step=step, train_samples=seen, load_s=load_s, cache_s=cache_s, loop_s=loop_s)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        adapter = accelerator.unwrap_model(model)

        def write(tmp: Path) -> None:
            adapter.save_pretrained(tmp)
            processor.save_pretrained(tmp)

        save_atomically(run, write)
    accelerator.end_training()
    accelerator.print(f"run directory: {run}")
    return run


def _prepare_run_dir(run: Path) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    # Logs of an earlier run (reachable only with --overwrite) would mix with this one's. Its adapter stays
    # until this run saves a new one.
    for stale in (METRICS_FILE, SAMPLES_FILE, "tensorboard"):
        target = run / stale
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    return run


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
        lm, kwargs = model.language_model, {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):  # the name since transformers 5.24
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model = add_lora(model, family, cfg)
    trainable, total = trainable_parameters(model)
    accelerator.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    return model, processor, family


@dataclass
class _Session:
    """What the loop's side jobs (logging, samples, validation) share."""

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

    def validate(self, loader: DataLoader, step: int, epoch: int, bar: Any) -> None:
        loss = evaluate_loss(self.model, loader, self.dtype)
        self.metrics.write(step=step, epoch=epoch, val_loss=loss)
        self.accelerator.log({"val/loss": loss}, step=step)
        bar.write(f"epoch {epoch}: validation loss {loss:.4f}")
        self.train_mode()

    def show_samples(self, step: int, bar: Any) -> None:
        if not self.samples or not self.accelerator.is_main_process:
            return
        inner = self.accelerator.unwrap_model(self.model)
        inner.eval()
        s = self.samples
        batch = self.family.encode(
            self.processor,
            [x["image"] for x in s],
            [x["prompt"] for x in s],
            None,
            max_length=self.cfg.max_length,
            padding_side="left",
        )
        batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        # generate() bypasses the prepared forward and its autocast; k-bit preparation leaves some weights fp32.
        with self.accelerator.autocast():
            got = self.family.generate(inner, self.processor, batch, max_new_tokens=self.cfg.max_length)
        for x, g in zip(s, got, strict=True):
            bar.write(f"step {step} sample: {g!r}  (reference: {x['target']!r})")
            self.sample_log.write(step=step, caption=g, reference=x["target"])
        self.train_mode()


@torch.no_grad()
def evaluate_loss(model: Any, loader: DataLoader, dtype: torch.dtype) -> float:
    """Mean loss over `loader`, weighted by each batch's number of target tokens. Leaves `model` in eval mode."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in loader:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += model(**batch).loss.float().item() * n
        tokens += n
    return total / max(tokens, 1)
