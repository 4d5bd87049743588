"""Florence-2 (`Florence2ForConditionalGeneration`, the transformers-native checkpoints): a DaViT vision tower,
a projector that adds position and temporal embeddings (577 image tokens at 768 pixels: one per 32-pixel cell
and a pooled one), and a BART encoder-decoder.

The encoder reads the image tokens then `<s> prompt </s>`; the processor writes that layout and turns a task
token (`<CAPTION>`, `<DETAILED_CAPTION>`, `<OCR>`, ...) into the words Florence-2 was trained on ("What does the
image describe?"). The decoder starts from `</s>` (BART's decoder start) and says `<s> caption </s>`, as
Florence-2 generates: the target trains with that `<s>` and its `</s>`, and generation starts from
`</s> <s>`, so that every token it makes (and counts against `max_new_tokens`) is the caption's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ._text import LORA_TARGETS, assemble, end_tokens
from ._vlm import TransformersVLM
from .base import Layout, only_images, require_image_tokens


class Florence2(TransformersVLM):
    name = "florence-2"
    model_types = ("florence2",)
    hub_ids = ("florence-community/Florence-2-base", "florence-community/Florence-2-large")
    groups = {
        "projector": "the projector (DaViT features + position embeddings -> language width)",
        "vision": "the DaViT vision tower",
    }
    caption_prompt = "<CAPTION>"
    question_template = "{question}"
    lora = "every BART linear: q_proj, k_proj, v_proj, out_proj, fc1, fc2 (encoder and decoder)"
    cache = "none (its forward takes no precomputed image features)"
    memory = "Florence-2-large (0.77B): ~5 GiB bf16 LoRA at batch 8 (estimate, not measured)"
    encoder_decoder = True

    def __init__(self, config: Any):
        super().__init__(config)
        self.image_token_id: int = config.image_token_id
        self.end_token_ids = end_tokens(config.text_config)
        self.bos_id: int = config.text_config.bos_token_id

    def lora_target_modules(self) -> str:
        return LORA_TARGETS["opt"]  # BART's projections carry OPT's names

    def _target_ids(self, tok: Any, target: str) -> list[int]:
        return [self.bos_id, *tok(target.strip(), add_special_tokens=False)["input_ids"]]

    def encode_batch(
        self,
        processor: Any,
        images: list[list[Image.Image]],
        prompts: Sequence[str],
        targets: Any,
        layout: Layout,
    ) -> dict[str, torch.Tensor]:
        """`input_ids`, `attention_mask` (the encoder's: image tokens, `<s> prompt </s>`), `pixel_values`, and
        with `targets` the decoder's `labels` (`<s> target </s>`; the model shifts them right itself)."""
        tok = processor.tokenizer
        enc = processor(images=only_images(images), text=list(prompts), padding=False)
        rows = [list(ids) for ids in enc["input_ids"]]
        pixels = torch.as_tensor(np.stack(enc["pixel_values"]))
        want = self._image_tokens(*pixels.shape[-2:])
        for ids in rows:
            require_image_tokens(ids, self.image_token_id, want)
        target_ids = [self._target_ids(tok, t) for t in targets] if targets is not None else None
        batch = assemble(
            rows,
            target_ids,
            encoder_decoder=True,
            end_id=self.end_token_id,
            pad_id=tok.pad_token_id,
            max_length=layout.max_length,
            image_tokens=want,
            # BART's positions are absolute, so the encoder's rows are padded on the right even to generate
            # (the decoder generates from its own start): left padding would shift a shorter prompt's
            # positions from what training saw
            padding_side="right",
        )
        batch["pixel_values"] = pixels
        return batch

    def _image_tokens(self, height: int, width: int) -> int:
        """What the vision tower gives for pixels of this size: one token per cell of its last stage's grid
        (the patch strides multiplied), and one pooled over them."""
        stride = math.prod(self.config.vision_config.patch_stride)
        return (height // stride) * (width // stride) + 1

    def count_tokens(
        self,
        processor: Any,
        prompt: str,
        target: str,
        history: tuple[tuple[str, str], ...],
        turn_images: tuple[int, ...] = (1,),
    ) -> int:
        # only the decoder's side is ever cut: `<s>`, the target, `</s>`
        return len(self._target_ids(processor.tokenizer, target)) + 1

    def generate_tokens(
        self, model: Any, processor: Any, batch: dict[str, torch.Tensor], **kwargs: Any
    ) -> torch.Tensor:
        # BART's generation config forces `</s>` as the last token max_new_tokens allows: that would take a
        # long caption's last word, and a row's limit would depend on the rest of its batch
        kwargs.setdefault("forced_eos_token_id", None)
        start = self.config.text_config.decoder_start_token_id
        rows = batch["input_ids"].shape[0]
        decoder = torch.tensor([[start, self.bos_id]] * rows, device=batch["input_ids"].device)
        # the base strips the decoder start; the `<s>` after it is the prompt's too
        return super().generate_tokens(model, processor, dict(batch, decoder_input_ids=decoder), **kwargs)[
            :, 1:
        ]
