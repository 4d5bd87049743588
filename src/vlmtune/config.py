"""What each command takes, as typed dataclasses. The CLI, YAML presets and the Python API all read these.

A field's `help` is its documentation everywhere: `--help`, the README and preset comments come from it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Quantize = Literal["none", "8bit", "4bit"]
DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"


def opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """LoRA fine-tuning of an image-to-text model on image-caption (or question-answer) pairs."""

    # model
    model: str = opt(DEFAULT_MODEL, "hub id, local directory, or 'tiny' (the shipped offline base)")
    dtype: Dtype = opt(
        "auto", "weights dtype: auto = bf16 on CUDA if supported, else fp16 on CUDA, fp32 on CPU"
    )
    quantize: Quantize = opt(
        "none", "load the base in 8bit or 4bit (QLoRA: nf4, double quant) via bitsandbytes"
    )
    # data
    data: str = opt(
        "ybelkada/football-dataset", "hub dataset id, datasets directory, parquet/arrow, imagefolder"
    )
    split: str = opt("train", "split to train on")
    val_split: str | None = opt(
        None, "split to validate on (default: none, or --val-fraction of the train split)"
    )
    val_fraction: float = opt(0.0, "fraction of the train split held out for validation when no --val-split")
    image_column: str = opt("image", "column holding the image")
    text_column: str = opt("text", "column holding the caption (the target)")
    prompt: str | None = opt(
        None, "text before every caption, masked out of the loss (e.g. 'a photo of'; default: the family's)"
    )
    question_column: str | None = opt(
        None,
        "VQA: column with the question; the prompt becomes 'Question: ... Answer:', the target --text-column",
    )
    skip_bad: bool = opt(False, "train on the good records and list the bad ones in RUN_DIR/skipped.jsonl")
    captions_per_epoch: Literal["all", "one"] = opt(
        "all", "images with several captions: train on every pair each epoch, or on one drawn per image"
    )
    streaming: bool = opt(
        False,
        "read the training split as a stream (nothing downloaded or loaded up front; needs --max-steps); "
        "bad records are skipped when reached and listed in RUN_DIR/skipped.jsonl",
    )
    shuffle_buffer: int = opt(1000, "with --streaming: records shuffled together (1: stream order)")
    group_by_length: bool = opt(
        False, "batch captions of similar length together (less padding; the epoch order stays random)"
    )
    image_root: str | None = opt(None, "folder the COCO annotations' file names are relative to")
    max_length: int = opt(
        64, "most text tokens per example (prompt + caption + end); longer captions are cut"
    )
    # LoRA
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA path")
    lora_targets: str | None = opt(None, "peft target_modules regex (default: the family's, see README)")
    train_modules: list[str] = opt(
        [],
        "module groups trained in full next to LoRA, saved with the adapter (the family's: `vlmtune models`; "
        "e.g. qformer projection for BLIP-2); comma- or space-separated",
    )
    train_qformer: bool = opt(False, "the same as --train-modules qformer")
    train_projection: bool = opt(False, "the same as --train-modules projection")
    # optimisation
    epochs: int = opt(5, "passes over the training split")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (overrides epochs)")
    batch_size: int = opt(4, "examples per device per step")
    grad_accum: int = opt(1, "gradient accumulation steps")
    lr: float = opt(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    scheduler: Literal["cosine", "linear", "constant"] = opt("cosine", "learning-rate schedule after warmup")
    warmup_ratio: float = opt(0.05, "fraction of the steps spent warming up linearly")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)")
    gradient_checkpointing: bool = opt(False, "trade compute for memory in the language model")
    compile: bool = opt(
        False, "torch.compile the language model (a minute or more of compiling first; pays off on long runs)"
    )
    vision_cache: Literal["auto", "off"] = opt(
        "auto",
        "compute the frozen ViT + Q-Former output once per image and reuse it every epoch (auto: when frozen)",
    )
    feature_cache_dir: str | None = opt(
        None,
        "keep the image features in this directory, named by the model and the data: a later run on the same "
        "model and data (a resume, a sweep) reads them instead of running the vision side again",
    )
    seed: int = opt(42, "seed for weights init, data order and dropout")
    num_workers: int = opt(0, "DataLoader worker processes decoding images")
    # evaluation during training (needs --val-split or --val-fraction)
    eval_every: int = opt(0, "optimizer steps between validations (0: at each epoch end)")
    eval_metrics: bool = opt(
        False, "also caption the validation split and score it (BLEU, METEOR, ROUGE-L, CIDEr-D)"
    )
    best_metric: str = opt(
        "val_loss", "what picks RUN_DIR/best/: val_loss (lower wins) or a caption metric (CIDEr-D, ...)"
    )
    # output, checkpoints, resuming
    output: str = opt("runs/blip2-lora", "run directory to write")
    overwrite: bool = opt(False, "replace an existing run directory's adapter and checkpoints")
    save_every: int = opt(0, "optimizer steps between checkpoints (0: at each epoch end only)")
    keep: int = opt(2, "checkpoints kept (the newest)")
    resume: str | None = opt(None, "'auto' (newest checkpoint in --output) or a checkpoint directory")
    max_bad_steps: int = opt(
        5, "stop after this many optimizer steps in a row with a non-finite loss or gradient"
    )
    log_every: int = opt(10, "optimizer steps between loss log lines")
    sample_every: int = opt(100, "optimizer steps between sample captions (0: only at the end)")
    num_samples: int = opt(2, "images captioned at each sample point")

    def groups(self) -> list[str]:
        """The module groups that train in full: --train-modules, with the older single-group spellings."""
        named = [g.strip() for item in self.train_modules for g in item.split(",") if g.strip()]
        for flag, group in ((self.train_qformer, "qformer"), (self.train_projection, "projection")):
            if flag and group not in named:
                named.append(group)
        return named


@dataclass
class CaptionConfig:
    """Caption image files or folders, with a base model or a fine-tuned run directory."""

    images: list[str] = opt([], "image files or folders", positional=True)
    run: str | None = opt(None, "run directory from `vlmtune train` (base model and adapter)")
    model: str | None = opt(None, "base model alone: hub id, local directory or 'tiny'")
    prompt: str = opt("", "text the caption continues (default: the run's training prompt)")
    batch_size: int = opt(8, "images per generate call")
    max_new_tokens: int = opt(40, "longest caption in tokens")
    num_beams: int = opt(1, "beam search width (1: greedy)")
    dtype: Dtype = opt("auto", "weights dtype")
    output: str | None = opt(None, "write .jsonl or .csv here instead of printing path<TAB>caption")


@dataclass
class AskConfig:
    """Visual question answering: one image, one question."""

    image: str = opt("", "image file", positional=True)
    question: str = opt("", "the question", positional=True)
    run: str | None = opt(None, "run directory from `vlmtune train`")
    model: str | None = opt(None, "base model alone: hub id, local directory or 'tiny'")
    template: str | None = opt(
        None,
        "prompt template, {question} is replaced (default: the family's, e.g. 'Question: {question} Answer:')",
    )
    max_new_tokens: int = opt(20, "longest answer in tokens")
    num_beams: int = opt(1, "beam search width (1: greedy)")
    dtype: Dtype = opt("auto", "weights dtype")


@dataclass
class MergeConfig:
    """Merge a run's LoRA adapter into its base and save a full model that plain transformers loads."""

    run: str = opt("", "run directory from `vlmtune train`", positional=True)
    out: str = opt("", "directory for the merged model", positional=True)
    dtype: Dtype = opt("auto", "dtype of the saved weights (auto: float32 on CPU, the base's on CUDA)")
    overwrite: bool = opt(False, "replace an existing output directory")


@dataclass
class EvaluateConfig:
    """Caption a dataset split and score it: BLEU, METEOR, ROUGE-L, CIDEr-D; metrics.json, report.html."""

    run: str | None = opt(None, "run directory from `vlmtune train`")
    model: str | None = opt(None, "base model alone: hub id, local directory or 'tiny'")
    data: str = opt("", "dataset (any layout `train --data` reads)")
    split: str | None = opt(None, "split to evaluate (default: validation, else test, else train)")
    image_column: str = opt("image", "column holding the image")
    text_column: str = opt("text", "column holding the reference caption (a string or a list of strings)")
    question_column: str | None = opt(
        None, "VQA: column with the question; --text-column then holds the answer(s); scores VQA accuracy"
    )
    compare: list[str] = opt(
        [], "more models in the same table: 'base' (the run's base), run dirs, model ids"
    )
    output: str | None = opt(None, "where results go (default: RUN_DIR/eval, or eval/ for --model)")
    limit: int | None = opt(None, "evaluate only the first N records")
    batch_size: int = opt(16, "images per generate call")
    max_new_tokens: int = opt(40, "longest caption in tokens")
    num_beams: int = opt(1, "beam search width (1: greedy)")
    dtype: Dtype = opt("auto", "weights dtype")


@dataclass
class DataCheckConfig:
    """Load a dataset the way training would; summarise it and list every bad record."""

    action: Literal["check"] = opt("check", "what to do", positional=True)
    data: str = opt(
        "",
        "dataset: hub id, datasets dir, parquet/arrow, imagefolder, COCO json, .jsonl/.csv",
        positional=True,
    )
    split: str | None = opt(None, "only this split (default: every split)")
    image_column: str = opt("image", "column holding the image")
    text_column: str = opt("text", "column holding the caption(s)")
    image_root: str | None = opt(None, "folder the COCO annotations' file names are relative to")
    max_length: int = opt(64, "token budget per caption: longer ones are counted as cut")
    model: str = opt("tiny", "whose tokenizer counts caption tokens (hub id, directory or 'tiny')")


@dataclass
class ModelsConfig:
    """List the model families vlmtune trains: checkpoints, LoRA targets, trainable groups, cache, memory."""

    json: bool = opt(False, "print the table as JSON")


@dataclass
class DemoConfig:
    """The offline demo: fine-tune the tiny base on drawn football scenes, then compare captions."""

    data: str = opt("data/football-synth", "where the drawn dataset is written (made if missing)")
    output: str = opt("runs/demo", "run directory")
    preset: str = opt("configs/tiny/demo.yaml", "training preset")


@dataclass
class ServeConfig:
    """Serve captions and answers over HTTP: an OpenAI-style API, multipart endpoints and a web page."""

    run: list[str] = opt(
        [], "run directories to serve, as NAME=RUN_DIR or RUN_DIR (named after its folder); all on one base"
    )
    model: str | None = opt(
        None, "base model (hub id, local directory or 'tiny'); with --run, must be theirs"
    )
    host: str = opt("127.0.0.1", "address to bind (0.0.0.0 exposes the server to the network)")
    port: int = opt(8000, "port to bind")
    api_key: str | None = opt(
        None, "require this key (Authorization: Bearer KEY) on every route but /health; or $VLMTUNE_API_KEY"
    )
    dtype: Dtype = opt("auto", "weights dtype")
    max_batch: int = opt(16, "most requests generated together in one batch")
    batch_wait_ms: float = opt(5.0, "how long the first request of a batch waits for others to join it")
    max_upload_mb: float = opt(20.0, "largest request body in MiB; larger ones get 413")
    max_pixels: int = opt(40_000_000, "largest image in pixels (width x height) accepted; larger gets 413")
    max_tokens: int = opt(256, "largest max_tokens a request may ask for")
    default_max_tokens: int = opt(40, "max_tokens when a request gives none")
    max_n: int = opt(8, "largest n (completions per request)")
    timeout: float = opt(60.0, "seconds a request may wait and run before it gets 504")


def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def load_yaml(path: str | os.PathLike, cls: type) -> dict[str, Any]:
    """Values from a YAML preset, checked against `cls`'s fields (an unknown key is an error, with the file)."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError([f"config file {path} does not exist"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"config file {path} is not valid YAML: {e}"]) from None
    if not isinstance(values, dict):
        raise ConfigError([f"config file {path} must hold a mapping of option: value"])
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(fields_of(cls)))
    if unknown:
        raise ConfigError([f"{path}: unknown option {k!r}" for k in unknown])
    return values


def validate_serve(cfg: ServeConfig) -> None:
    p: list[str] = []
    if not cfg.run and not cfg.model:
        p.append("give --run RUN_DIR (one or more, NAME=RUN_DIR to name them) or --model MODEL")
    for name in ("max_batch", "max_tokens", "default_max_tokens", "max_n", "max_pixels"):
        if getattr(cfg, name) < 1:
            p.append(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    for name in ("max_upload_mb", "timeout"):
        if getattr(cfg, name) <= 0:
            p.append(f"--{name.replace('_', '-')} must be positive (got {getattr(cfg, name)})")
    if cfg.batch_wait_ms < 0:
        p.append(f"--batch-wait-ms must be 0 or more (got {cfg.batch_wait_ms})")
    if cfg.default_max_tokens > cfg.max_tokens:
        p.append(f"--default-max-tokens {cfg.default_max_tokens} is over --max-tokens {cfg.max_tokens}")
    if not 0 < cfg.port < 65536:
        p.append(f"--port must be in 1..65535 (got {cfg.port})")
    if p:
        raise ConfigError(p)


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

    from .families import family_for
    from .modeling import ModelLoadError, load_config

    try:
        # The config alone: an unknown or unsupported model, or an unreachable hub id, before any weights.
        family = family_for(load_config(cfg.model))
    except (ModelLoadError, ValueError) as e:
        p.append(f"--model: {e}")
    else:
        unknown = [g for g in cfg.groups() if g not in family.groups]
        if unknown:
            offered = ", ".join(f"{g} ({why})" for g, why in family.groups.items()) or "none"
            p.append(
                f"--train-modules {', '.join(unknown)}: {family.name} has no such module group; its groups: "
                f"{offered}"
            )
    if cfg.dtype == "float16" and not torch.cuda.is_available():
        p.append("--dtype float16 needs a CUDA GPU; on the CPU use float32 (or bfloat16)")
    if cfg.dtype == "bfloat16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        p.append("--dtype bfloat16 is not supported by this GPU; use float16 (or auto)")
    for name in ("keep", "max_bad_steps"):
        if getattr(cfg, name) < 1:
            p.append(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    from .metrics import CAPTION_METRICS

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


def validate_against_model(cfg: TrainConfig, model: Any, trainable: int) -> None:
    """The checks that need the loaded model: LoRA targets that exist, disk for the checkpoints planned."""
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
