"""The language-model side that several families share: where the target goes and where LoRA goes.

A decoder-only language model (OPT, LLaMA/Vicuna) reads one sequence, image tokens and prompt then the target;
the labels cover the target alone:

    image tokens | prompt tokens | target tokens | end | padding
    ------------- -100 ----------- | trained ------------ | -100

An encoder-decoder one (T5, Flan-T5) reads image tokens and prompt in its encoder, and the target is its
decoder's whole sequence (the decoder input is the labels shifted right, which the model does itself):

    encoder: image tokens | prompt tokens (+ its end, as T5's tokenizer adds) | padding
    labels:  target tokens | end | -100 ...
"""

from __future__ import annotations

from typing import Any

import torch

from .base import IGNORE_INDEX, pad_rows, trained_span

# peft target_modules regexes over the linear layers of each language model, anchored under
# `language_model` because vision encoders reuse names such as fc1/fc2.
LORA_TARGETS = {
    "opt": r".*language_model.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
    "llama": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    "t5": r".*language_model.*\.(q|k|v|o|wi|wi_0|wi_1|wo)",
}


def lora_targets(text_config: Any, family: str) -> str:
    kind = text_config.model_type
    if kind not in LORA_TARGETS:
        raise NotImplementedError(
            f"{family} with a {kind} language model is not supported yet (supported: "
            f"{', '.join(sorted(LORA_TARGETS))}); give --lora-targets to place LoRA yourself"
        )
    return LORA_TARGETS[kind]


def end_tokens(text_config: Any) -> frozenset[int]:
    """The language model's end-of-sequence id(s), from its config (a list in some checkpoints)."""
    eos = text_config.eos_token_id
    ids = eos if isinstance(eos, (list, tuple)) else [eos]
    if not ids or any(i is None for i in ids):
        raise ValueError(f"the {text_config.model_type} config names no eos_token_id")
    return frozenset(int(i) for i in ids)


def assemble(
    prompt_ids: list[list[int]],
    target_ids: list[list[int]] | None,
    *,
    encoder_decoder: bool,
    end_id: int,
    pad_id: int,
    max_length: int,
    image_tokens: int | list[int],
    padding_side: str,
    prompt_labels: list[list[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """The batch for prompts already tokenised with their image tokens (`image_tokens` of them per row, or a
    count for each row, not counted against `max_length`), and their targets tokenised without special tokens (None: generation).
    `prompt_labels` (decoder-only): the prompt side's labels where a dialogue's earlier replies train."""
    rows, labels = [], []
    per_row = image_tokens if isinstance(image_tokens, list) else [image_tokens] * len(prompt_ids)
    for k, ids in enumerate(prompt_ids):
        text = len(ids) - per_row[k]
        room = max_length if encoder_decoder else max_length - text
        if text > max_length or (target_ids is not None and room < 1):
            raise ValueError(
                f"the prompt (and history) alone takes {text} tokens, over --max-length {max_length}; raise it"
            )
        span = trained_span(target_ids[k], end_id, room) if target_ids is not None else []
        if encoder_decoder:
            rows.append(ids)
            labels.append(span)
        else:
            rows.append(ids + span)
            before = prompt_labels[k] if prompt_labels else [IGNORE_INDEX] * len(ids)
            labels.append(before + span)
    if encoder_decoder:
        batch = pad_rows(rows, None, pad_id, padding_side)
        if target_ids is not None:
            batch["labels"] = pad_rows(labels, labels, pad_id, "right")["labels"]
        return batch
    return pad_rows(rows, labels if target_ids is not None else None, pad_id, padding_side)


def target_text(prompt: str, target: str, encoder_decoder: bool) -> str:
    """The target as it is tokenised: after a prompt ("... Answer:") the answer is a new word, so a
    byte-level tokenizer gets its leading space; a bare caption, or a decoder's own sequence, starts clean."""
    target = target.strip()
    return " " + target if prompt and not encoder_decoder else target
