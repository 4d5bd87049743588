"""Checks before training: everything the options and the model's config alone can show, before any weights load
(`validate_train`), then what needs the loaded model (`validate_against_model`); each raises one error that
lists every problem."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import tracking
from ..config import Dtype, Quantize, TrainConfig
from ..errors import ConfigError


def validate_train(cfg: TrainConfig) -> None:
    """Check everything that can be checked before loading any weights; raise one error listing every problem."""
    p: list[str] = []
    for name in ("epochs", "batch_size", "grad_accum", "lora_r", "lora_alpha", "max_length", "log_every"):
        if getattr(cfg, name) < 1:
            p.append(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        p.append(f"--max-steps must be at least 1 (got {cfg.max_steps})")
    if cfg.lr <= 0:
        p.append(f"--lr must be positive (got {cfg.lr})")
    if not 0 <= cfg.lora_dropout < 1:
        p.append(f"--lora-dropout must be in [0, 1) (got {cfg.lora_dropout})")
    if cfg.lm_dropout is not None and not 0 <= cfg.lm_dropout < 1:
        p.append(f"--lm-dropout must be in [0, 1) (got {cfg.lm_dropout})")
    if cfg.streaming:
        for bad, why in (
            (cfg.max_steps is None, "--streaming needs --max-steps: a stream's length is unknown"),
            (cfg.val_fraction, "--streaming cannot hold out a --val-fraction; give a --val-split"),
            (
                cfg.captions_per_epoch == "one",
                "--captions-per-epoch one needs every image's captions: not with --streaming",
            ),
            (cfg.group_by_length, "--group-by-length needs every caption's length: not with --streaming"),
        ):
            if bad:
                p.append(why)
        if cfg.shuffle_buffer < 1:
            p.append(f"--shuffle-buffer must be at least 1 (got {cfg.shuffle_buffer})")
    if not 0 <= cfg.val_fraction < 1:
        p.append(f"--val-fraction must be in [0, 1) (got {cfg.val_fraction})")
    if not 0 <= cfg.warmup_ratio < 1:
        p.append(f"--warmup-ratio must be in [0, 1) (got {cfg.warmup_ratio})")
    if cfg.val_split and cfg.val_fraction:
        p.append("give --val-split or --val-fraction, not both")
    for name, allowed in (("dtype", Dtype), ("quantize", Quantize)):
        choices = allowed.__args__
        if getattr(cfg, name) not in choices:
            p.append(f"--{name} must be one of {', '.join(choices)} (got {getattr(cfg, name)!r})")
    p += tracking.problems(cfg.report_to)
    if cfg.quantize != "none":
        import torch

        if not torch.cuda.is_available():
            p.append(f"--quantize {cfg.quantize} needs a CUDA GPU (bitsandbytes); none is available here")
        else:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                p.append(f"--quantize {cfg.quantize} needs bitsandbytes: pip install 'vlmtune[quant]'")
    import torch

    from ..families import family_for
    from ..modeling import ModelLoadError, load_config
    from .loss import unchunkable

    try:
        # The config alone: an unknown or unsupported model, or an unreachable hub id, before any weights.
        family = family_for(load_config(cfg.model))
    except (ModelLoadError, ValueError) as e:
        p.append(f"--model: {e}")
    else:
        if (cfg.min_pixels or cfg.max_pixels) and not family.dynamic_resolution:
            from ..families import FAMILIES

            dynamic = ", ".join(f.name for f in FAMILIES if f.dynamic_resolution)
            p.append(
                f"--min-pixels / --max-pixels: {family.name} resizes every image to one size; they apply to "
                f"the dynamic-resolution families ({dynamic})"
            )
        try:
            rates = cfg.group_lrs()
        except ConfigError as e:
            p.extend(e.problems)
            rates = {}
        for group, rate in rates.items():
            if group not in cfg.groups():
                p.append(f"--group-lr {group}: that group does not train; add it to --train-modules")
            if rate <= 0:
                p.append(f"--group-lr {group}: the learning rate must be positive (got {rate})")
        if cfg.packing and family.packable is None:
            p.append(
                f"--packing: {family.name} cannot pack examples into rows (it needs a decoder-only language "
                "model that takes positions and an attention mask per example); train without it"
            )
        if cfg.loss_chunk and unchunkable(family):  # known from the config: before any weights load
            p.append(f"--loss-chunk: {unchunkable(family)}; train without it")
        unknown = [g for g in cfg.groups() if g not in family.groups]
        if unknown:
            offered = ", ".join(f"{g} ({why})" for g, why in family.groups.items()) or "none"
            p.append(
                f"--train-modules {', '.join(unknown)}: {family.name} has no such module group; its groups: "
                f"{offered}"
            )
    if cfg.lora_dtype == "base" and cfg.dtype == "float16":
        p.append("--lora-dtype base with --dtype float16: fp16 weights cannot train under a gradient scaler; use "
                 "--dtype bfloat16, or --lora-dtype float32")  # fmt: skip
    if cfg.loss_chunk is not None and cfg.loss_chunk < 0:
        p.append(f"--loss-chunk must be 0 (the model's own loss) or more (got {cfg.loss_chunk})")
    if cfg.pad_to_multiple_of is not None and cfg.pad_to_multiple_of < 0:
        p.append(f"--pad-to-multiple-of must be 0 (no padding) or more (got {cfg.pad_to_multiple_of})")
    if cfg.pad_to_multiple_of and cfg.packing:
        p.append("--pad-to-multiple-of pads unpacked rows, and --packing packs them; choose one")
    if cfg.compile_mode != "default" and not cfg.compile:
        p.append(f"--compile-mode {cfg.compile_mode} needs --compile")
    if cfg.pack_length < 0:
        p.append(f"--pack-length must be 0 (the longest example) or more (got {cfg.pack_length})")
    for name in ("min_pixels", "max_pixels"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            p.append(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.min_pixels and cfg.max_pixels and cfg.min_pixels > cfg.max_pixels:
        p.append(f"--min-pixels {cfg.min_pixels} is over --max-pixels {cfg.max_pixels}")
    if cfg.dtype == "float16" and not torch.cuda.is_available():
        p.append("--dtype float16 needs a CUDA GPU; on the CPU use float32 (or bfloat16)")
    if cfg.dtype == "bfloat16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        p.append("--dtype bfloat16 is not supported by this GPU; use float16 (or auto)")
    for name in ("keep", "max_bad_steps"):
        if getattr(cfg, name) < 1:
            p.append(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    from ..metrics import CAPTION_METRICS

    if cfg.best_metric not in ("val_loss", *CAPTION_METRICS):
        p.append(
            f"--best-metric must be val_loss or one of {', '.join(CAPTION_METRICS)} (got {cfg.best_metric!r})"
        )
    elif cfg.best_metric != "val_loss" and not cfg.eval_metrics:
        p.append(f"--best-metric {cfg.best_metric} needs --eval-metrics (captions are scored only then)")
    if cfg.eval_every < 0:
        p.append(f"--eval-every must be 0 or more (got {cfg.eval_every})")
    if cfg.save_every < 0:
        p.append(f"--save-every must be 0 or more (got {cfg.save_every})")
    out = Path(cfg.output)
    if cfg.resume and cfg.overwrite:
        p.append("give --resume or --overwrite, not both")
    elif cfg.resume:
        from .checkpoint import resolve_resume

        try:
            resolve_resume(out, cfg.resume)
        except FileNotFoundError as e:
            p.append(str(e))
    elif not cfg.overwrite and ((out / "adapter_config.json").exists() or (out / "checkpoints").exists()):
        p.append(
            f"{out} already holds a trained adapter or checkpoints; pass --resume auto to continue it, "
            "--overwrite to replace it, or choose another --output"
        )
    for flag, where in (("--output", out), ("--feature-cache-dir", cfg.feature_cache_dir)):
        if where is None:
            continue
        parent = next((d for d in [Path(where), *Path(where).parents] if d.exists()), Path("."))
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            p.append(f"{flag} {where}: {parent} is not a writable directory")
    if p:
        raise ConfigError(p)


def validate_engine(distributed_type: Any) -> None:
    """Refuse the sharded engines vlmtune has not been proven on, before any weights load.

    Accelerate turns FSDP and DeepSpeed on only for GPU launches (with `--cpu` its `--use_fsdp` runs plain DDP),
    and no machine here has two GPUs: the adapter save, checkpoints, validation and samples are DDP's (one
    process writes, each validates its share), which under sharded parameters would write shards or wait on
    a collective the other processes never join. A clear error now beats a hang after hours of training.
    """
    name = getattr(distributed_type, "value", str(distributed_type))
    if name in ("FSDP", "DEEPSPEED"):
        raise ConfigError(
            [
                f"the launcher asks for {name}, which vlmtune does not support yet (untested here: Accelerate "
                "runs it on GPUs only). Launch data-parallel instead (`accelerate launch --multi_gpu` or "
                "`torchrun`): the LoRA weights are small, and --quantize 4bit or --gradient-checkpointing fit a "
                "larger base per GPU."
            ]
        )


def validate_against_model(cfg: TrainConfig, model: Any, trainable: int, family: Any = None) -> None:
    """The checks that need the loaded model: LoRA targets that exist, attention that packing can use, an
    output layer that --loss-chunk can apply (with `family`, once LoRA is on), disk for the checkpoints."""
    import difflib
    import re
    import shutil

    p: list[str] = []
    if cfg.lora_targets:
        names = [n for n, _ in model.named_modules()]
        if not any(re.fullmatch(cfg.lora_targets, n) for n in names):
            leaves = sorted(
                {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"}
            )
            words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", cfg.lora_targets)
            parts = {part for n in names for part in n.split(".")}  # words that name something are fine
            close = sorted(
                {c for w in words if w not in parts for c in difflib.get_close_matches(w, leaves, n=1)}
            )
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            p.append(
                f"--lora-targets {cfg.lora_targets!r} matches no module of this model (a regex over full module "
                f"names, e.g. 'language_model.model.decoder.layers.0.self_attn.q_proj').{hint} "
                f"Its linear layers: {', '.join(leaves)}"
            )
    attention = getattr(model.config.get_text_config(), "_attn_implementation", None)
    if cfg.packing and attention not in ("sdpa", "eager", None):
        p.append(
            f"--packing keeps packed examples apart with a 4D attention mask, which {attention} attention does "
            "not take: load the model with sdpa or eager attention, or train without --packing"
        )
    if cfg.loss_chunk and family is not None:
        from .loss import output_layer, transformers_model

        why = output_layer(transformers_model(model), family)[1]
        if why:
            p.append(f"--loss-chunk: {why}; train without it")
    # Each checkpoint holds the trainable weights and AdamW's two moments, fp32: 12 bytes per parameter.
    need = 12 * trainable * (cfg.keep + 1) + 4 * trainable
    out = Path(cfg.output)
    free = shutil.disk_usage(out if out.exists() else out.parent).free
    if free < need:
        p.append(
            f"--output {out}: {free / 2**30:.2f} GiB free, but {cfg.keep} checkpoints and the adapter need about "
            f"{need / 2**30:.2f} GiB; free some space, lower --keep, or write elsewhere"
        )
    if p:
        raise ConfigError(p)
