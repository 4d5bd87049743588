"""Loading a base model (hub id, local directory or the shipped tiny base), adding LoRA, loading a run."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError
from .families import Family, family_for

TINY = "tiny"
TINY_PATH = Path(__file__).parent / "assets" / "tiny-blip2"


def resolve_model(name: str) -> str:
    """'tiny' -> the packaged tiny base; an existing directory -> its absolute path; anything else is a hub id.

    Absolute paths matter: they end up as the adapter's `base_model_name_or_path`, which plain peft follows.
    """
    if name == TINY:
        return str(TINY_PATH)
    if os.path.isdir(name):
        return str(Path(name).resolve())
    return name


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA where the card supports it, else fp16 on CUDA, fp32 on the CPU."""
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _unreachable(name: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load model {name!r}: it is not a local directory, and the Hugging Face Hub could not be reached "
        f"or has no such repository ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).\n"
        f"To use a local copy: on a machine with network run `hf download {name} --local-dir DIR`, copy DIR "
        f"here and pass `--model DIR` (or set HF_HOME to a cache that holds it). `--model tiny` needs no download."
    )


def load_config(name: str) -> Any:
    from transformers import AutoConfig

    path = resolve_model(name)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        if os.path.isdir(path):
            raise ModelLoadError(
                f"{path} is not a transformers model directory (no usable config.json): {e}"
            ) from e
        raise _unreachable(name, e) from e


def load_processor(path: str) -> Any:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        if os.path.isdir(path):
            raise ModelLoadError(f"{path} holds no processor (tokenizer + image processor): {e}") from e
        raise _unreachable(path, e) from e


# Where language models keep their dropout probabilities (OPT: dropout, attention_dropout, activation_dropout;
# LLaMA-kind: attention_dropout; T5: dropout_rate; BART: dropout and friends).
DROPOUT_FIELDS = ("dropout", "attention_dropout", "activation_dropout", "dropout_rate", "hidden_dropout")


def load_base(
    name: str,
    dtype: str = "auto",
    quantize: str = "none",
    device: torch.device | None = None,
    lm_dropout: float | None = None,
) -> tuple[Any, Any, Family]:
    """The base model (on `device`, in eval mode, every weight frozen), its processor and its family;
    `lm_dropout`, given, replaces every dropout probability of the language model's config."""
    from transformers import AutoModelForImageTextToText

    device = device or default_device()
    path = resolve_model(name)
    config = load_config(name)
    family = family_for(config)
    torch_dtype = pick_dtype(dtype, device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if lm_dropout is not None:
        text = config.get_text_config()
        for field in DROPOUT_FIELDS:
            if isinstance(getattr(text, field, None), (int, float)):
                setattr(text, field, lm_dropout)
        kwargs["config"] = config
    if quantize != "none":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if torch_dtype == torch.float32 else torch_dtype
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if quantize == "8bit"
            else BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            )
        )
    if device.type == "cuda":  # straight onto the GPU, without a full copy in host memory first
        kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except OSError as e:
        raise _unreachable(name, e) from e
    if "device_map" not in kwargs:
        model.to(device)
    model.requires_grad_(False)
    model.eval()
    return model, load_processor(path), family


def add_lora(model: Any, family: Family, cfg: Any) -> Any:
    """Wrap `model` with LoRA adapters where `family` (or --lora-targets) says; returns a peft model."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_targets or family.lora_target_modules(),
        modules_to_save=family.modules_to_save(cfg.groups()) or None,
        bias="none",
    )
    # autocast_adapter_dtype (peft's default) keeps LoRA weights in fp32 over an fp16/bf16 base: fp32 master
    # weights for the only parameters that train, for a cast of every wrapped layer's input to fp32 and back
    # (--lora-dtype base keeps them in the base's dtype instead).
    with _peft_quietly():
        autocast = getattr(cfg, "lora_dtype", "float32") == "float32"
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=autocast)
    # Under gradient checkpointing peft makes the output of every input embedding require grad, the vision
    # tower's patch embedding's included: a frozen tower would then keep its whole graph and run backward for
    # nothing. Non-reentrant checkpointing needs no such hook (the language model's own stays).
    model.disable_input_require_grads()
    return peft_model


@contextlib.contextmanager
def _peft_quietly() -> Iterator[None]:
    # peft 0.21 reads a property transformers 5.24 deprecated; the user can do nothing about it.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def trainable_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def param_groups(model: Any, family: Any, cfg: Any) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: LoRA (and every group without a rate of its own) at `cfg.lr`, and each
    --group-lr group's modules (peft's trainable copies, `<module>.modules_to_save.`) at its own rate."""
    rates = cfg.group_lrs()
    marks = {g: [f".{m}.modules_to_save." for m in family.group_modules(g)] for g in rates}
    own: dict[str, list[Any]] = {g: [] for g in rates}
    rest = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = next((g for g, ms in marks.items() if any(m in f".{name}" for m in ms)), None)
        (own[group] if group else rest).append(param)
    return [{"params": rest, "lr": cfg.lr}] + [
        {"params": ps, "lr": rates[g], "name": g} for g, ps in own.items()
    ]


def base_of_runs(runs: dict[str, str], model: str | None = None) -> tuple[str, dict[str, dict[str, Any]]]:
    """The one base model of `runs` (and of `model`, when given), resolved, and each run's recorded config.
    Reads configs only, so a mismatch fails before any weights load."""
    from .rundir import RunDirError, read_run

    infos = {name: read_run(path) for name, path in runs.items()}
    bases = {resolve_model(info["base_model"]) for info in infos.values()}
    if model is not None:
        bases.add(resolve_model(model))
    if len(bases) > 1:
        listed = "; ".join(f"{runs[n]}: {i['base_model']}" for n, i in infos.items())
        raise RunDirError(
            f"the runs were trained on different base models ({listed}"
            f"{'; --model: ' + model if model else ''}); one model can only carry adapters of its own base"
        )
    return bases.pop(), infos


def load_with_adapters(
    base: str, runs: dict[str, str], dtype: str = "auto", device: torch.device | None = None
) -> tuple[Any, Any, Family]:
    """`base` with each run's LoRA adapter loaded under its key as the peft adapter name (a bare base model
    when there are none), in eval mode; the processor is the first run's, the one its training used (it may
    differ from a later revision of the base's)."""
    model, processor, family = load_base(base, dtype, device=device)
    if not runs:
        return model, processor, family
    from peft import PeftModel

    for i, (name, path) in enumerate(runs.items()):
        with _peft_quietly():
            if i == 0:
                model = PeftModel.from_pretrained(model, path, adapter_name=name)
            else:
                model.load_adapter(path, adapter_name=name)
    model.eval()
    return model, load_processor(str(Path(next(iter(runs.values()))).resolve())), family


def describe_for_inference(run: str | None, model: str | None) -> tuple[str, Any, Family, dict[str, Any]]:
    """(base model, processor, family, run config) from a run directory or a base model alone, no weights
    loaded: for an engine that loads them itself. The processor is the run's, as training saved it."""
    if (run is None) == (model is None):
        raise ValueError("give exactly one of --run RUN_DIR or --model MODEL")
    base, infos = base_of_runs({"run": run} if run is not None else {}, model)
    family = family_for(load_config(base))
    return base, load_processor(str(Path(run).resolve()) if run else base), family, infos.get("run", {})


def load_for_inference(
    run: str | None, model: str | None, dtype: str = "auto", device: torch.device | None = None
) -> tuple[Any, Any, Family, dict[str, Any]]:
    """(model, processor, family, run config) from a run directory or a base model alone."""
    if (run is None) == (model is None):
        raise ValueError("give exactly one of --run RUN_DIR or --model MODEL")
    runs = {"default": run} if run is not None else {}  # "default": peft's own name for a lone adapter
    base, infos = base_of_runs(runs, model)
    loaded, processor, family = load_with_adapters(base, runs, dtype, device)
    return loaded, processor, family, infos.get("default", {})
