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
Engine = Literal["transformers", "vllm"]
ENGINE_HELP = (
    "what generates: transformers' generate, or vLLM's engine (`pip install 'vlmtune[vllm]'`; BLIP-2 with OPT; "
    "the same captions, greedy)"
)
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
    messages_column: str = opt(
        "messages", "conversation data: column holding each record's messages (any layout: see README)"
    )
    images_column: str = opt("images", "conversation data: column holding each record's images")
    train_on_last_turn_only: bool = opt(
        False, "conversations: train each conversation's last reply only (default: every assistant turn)"
    )
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
    packing: bool = opt(
        False,
        "lay each batch's examples end to end in a few rows, each attending to itself alone (padding-free; "
        "the same loss and gradients): less work where captions differ in length",
    )
    pack_length: int = opt(
        0,
        "with --packing: the most positions a row holds (0: the batch's longest example, so no row costs "
        "more than an example of the padded batch)",
    )
    image_root: str | None = opt(None, "folder the COCO annotations' file names are relative to")
    max_length: int = opt(
        64, "most text tokens per example (prompt + caption + end); longer captions are cut"
    )
    min_pixels: int | None = opt(
        None,
        "dynamic-resolution families (Qwen-VL): fewest pixels an image is resized to (default: the processor's)",
    )
    max_pixels: int | None = opt(
        None,
        "dynamic-resolution families (Qwen-VL): most pixels an image is resized to, so fewer image tokens and "
        "less memory (e.g. 401408 = 512 x 784; default: 589824 = 768 x 768, or the processor's if lower: a "
        "photo at Qwen's own limit gives up to 16384 tokens)",
    )
    # LoRA
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA path")
    lora_dtype: Literal["float32", "base"] = opt(
        "float32",
        "LoRA weights over a bf16 base: float32 (fp32 master weights; each wrapped layer's input is cast up to "
        "meet them) or base (the base's dtype: no casts, half the adapter's memory, bf16 updates)",
    )
    lm_dropout: float | None = opt(
        None, "the language model's own dropout (OPT's 0.1; most chat models' 0); default: the checkpoint's"
    )
    lora_targets: str | None = opt(None, "peft target_modules regex (default: the family's, see README)")
    train_modules: list[str] = opt(
        [],
        "module groups trained in full next to LoRA, saved with the adapter (the family's: `vlmtune models`; "
        "e.g. qformer projection for BLIP-2); comma- or space-separated",
    )
    group_lr: list[str] = opt(
        [],
        "a learning rate of its own for a --train-modules group, as NAME=LR (e.g. vision=1e-5 projector=5e-5); "
        "LoRA and the other groups train at --lr",
    )
    lr_vision: float | None = opt(None, "the same as --group-lr vision=LR")
    lr_projector: float | None = opt(None, "the same as --group-lr projector=LR")
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
    loss_chunk: int | None = opt(
        None,
        "score the loss over the target positions only, this many at a time, so the batch's logits (positions "
        "x vocabulary, in fp32) are never in memory at once; the same loss and gradients (default: 1024 where "
        "the model allows; 0: the model's own loss, over every kept position)",
    )
    compile: bool = opt(
        False,
        "torch.compile the language model (a minute or more of compiling first; meant for long GPU runs: on "
        "the CPU it measured slower even in steady state)",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = opt(
        "default",
        "torch.compile's mode with --compile (reduce-overhead: CUDA graphs on a GPU, one per padded shape)",
    )
    pad_to_multiple_of: int | None = opt(
        None,
        "pad each batch's positions up to a multiple of this, so a compiled model sees a few fixed shapes and "
        "compiles each once (default: 32 with --compile and no --packing, else 0: to the batch's longest "
        "example)",
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
    report_to: list[str] = opt(
        ["tensorboard"],
        "experiment trackers, comma- or space-separated: tensorboard, mlflow, wandb, trackio, or none",
    )
    tracker_project: str = opt(
        "vlmtune", "the project (W&B, trackio) or experiment (MLflow) runs are logged under"
    )

    def padding_multiple(self) -> int:
        """--pad-to-multiple-of, or its default: 32 when compiling unpacked rows (fixed shapes), else none."""
        if self.pad_to_multiple_of is not None:
            return self.pad_to_multiple_of
        return 32 if self.compile and not self.packing else 0  # packed rows vary in number and width

    def group_lrs(self) -> dict[str, float]:
        """--group-lr as {group: lr}, with --lr-vision / --lr-projector; a malformed item raises ConfigError."""
        out: dict[str, float] = {}
        for item in (i.strip() for entry in self.group_lr for i in entry.split(",") if i.strip()):
            name, sep, value = item.partition("=")
            try:
                out[name.strip()] = float(value)
            except ValueError:
                raise ConfigError([f"--group-lr {item!r}: give NAME=LR, e.g. vision=1e-5"]) from None
            if not sep:
                raise ConfigError([f"--group-lr {item!r}: give NAME=LR, e.g. vision=1e-5"])
        for group, value in (("vision", self.lr_vision), ("projector", self.lr_projector)):
            if value is not None:
                out[group] = value
        return out

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
    engine: Engine = opt("transformers", ENGINE_HELP)


@dataclass
class AskConfig:
    """Visual question answering: a question about an image (or several, for families that read several)."""

    images: list[str] = opt([], "image file(s), in the order the question refers to them", positional=True)
    question: str = opt("", "the question", positional=True)
    run: str | None = opt(None, "run directory from `vlmtune train`")
    model: str | None = opt(None, "base model alone: hub id, local directory or 'tiny'")
    template: str | None = opt(
        None,
        "prompt template, {question} is replaced (default: the family's, e.g. 'Question: {question} Answer:')",
    )
    history: str | None = opt(
        None,
        "a JSON file of the conversation so far (a list of messages, in any conversation layout): the "
        "question continues it",
    )
    max_new_tokens: int = opt(20, "longest answer in tokens")
    num_beams: int = opt(1, "beam search width (1: greedy)")
    dtype: Dtype = opt("auto", "weights dtype")


@dataclass
class ChatConfig:
    """Talk about an image in the terminal: the history is kept; /new restarts, /image PATH switches, /add PATH
    shows another with your next line."""

    images: list[str] = opt([], "image file(s) the conversation starts with", positional=True)
    run: str | None = opt(None, "run directory from `vlmtune train`")
    model: str | None = opt(None, "base model alone: hub id, local directory or 'tiny'")
    system: str = opt("", "a system turn to start each conversation with")
    max_new_tokens: int = opt(40, "longest reply in tokens")
    dtype: Dtype = opt("auto", "weights dtype")


@dataclass
class PushConfig:
    """Upload a run directory to the Hub as a model repo: the adapter, processor, model card, logs and report."""

    run: str = opt("", "run directory from `vlmtune train`", positional=True)
    repo_id: str = opt("", "the Hub repo to create or update, as user/name or org/name", positional=True)
    private: bool = opt(False, "create the repo private (an existing repo keeps its visibility)")
    revision: str = opt("main", "branch to commit to")
    message: str | None = opt(None, "commit message (default: what the run trained)")
    checkpoints: bool = opt(
        False, "upload checkpoints/ too (optimizer states: large, for resuming elsewhere)"
    )
    token: str | None = opt(None, "Hub token (default: HF_TOKEN or the one `hf auth login` saved)")
    endpoint: str | None = opt(None, "Hub endpoint (default: HF_ENDPOINT, else huggingface.co)")


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
    messages_column: str = opt("messages", "conversation data: column holding each record's messages")
    images_column: str = opt("images", "conversation data: column holding each record's images")
    compare: list[str] = opt(
        [], "more models in the same table: 'base' (the run's base), run dirs, model ids"
    )
    output: str | None = opt(None, "where results go (default: RUN_DIR/eval, or eval/ for --model)")
    limit: int | None = opt(None, "evaluate only the first N records")
    batch_size: int = opt(16, "images per generate call")
    max_new_tokens: int = opt(40, "longest caption in tokens")
    num_beams: int = opt(1, "beam search width (1: greedy)")
    dtype: Dtype = opt("auto", "weights dtype")
    engine: Engine = opt("transformers", ENGINE_HELP)


@dataclass
class DataCheckConfig:
    """Load a dataset the way training would; summarise it and list every bad record."""

    action: Literal["check"] = opt("check", "what to do", positional=True)
    data: str = opt(
        "",
        "dataset: hub id, datasets dir, parquet/arrow, imagefolder, COCO json, .jsonl/.csv, conversations",
        positional=True,
    )
    split: str | None = opt(None, "only this split (default: every split)")
    image_column: str = opt("image", "column holding the image")
    text_column: str = opt("text", "column holding the caption(s)")
    messages_column: str = opt("messages", "conversation data: column holding each record's messages")
    images_column: str = opt("images", "conversation data: column holding each record's images")
    image_root: str | None = opt(None, "folder the COCO annotations' file names are relative to")
    max_length: int = opt(64, "token budget per caption: longer ones are counted as cut")
    min_pixels: int | None = opt(None, "as train's --min-pixels: image tokens are counted at it")
    max_pixels: int | None = opt(
        None, "as train's --max-pixels (and its default): image tokens are counted at it"
    )
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
    engine: Engine = opt("transformers", ENGINE_HELP + "; streamed replies come in one piece")
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
