"""BLIP (`BlipForConditionalGeneration`, `Salesforce/blip-image-captioning-base/large`), the classic captioner:
a ViT, and a BERT-style text decoder that cross-attends to the ViT's output.

The decoder's sequence, for one example:

    [DEC] (bos) | prompt tokens | target tokens | [SEP] | padding
    --- -100 ------------------ | trained ------------- | -100

The decoder starts from its `bos_token_id` ([DEC], not the tokenizer's [CLS]), and a caption ends with
[SEP] (`sep_token_id`), which is also where generation stops, as in BLIP's own `generate`. Its position
embeddings are absolute and generation reads no position ids, so a left-padded batch would shift every row's
positions: rows with prompts of different lengths are generated apart (`generation_groups`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .base import IGNORE_INDEX, Family, Layout, only_images, pad_rows, trained_span, unwrap

# Every linear layer of the text decoder's layers: self- and cross-attention (query, key, value, output
# dense), the MLP (intermediate and output dense); anchored under text_decoder (the ViT's are qkv, fc1...).
BLIP_TARGETS = r".*text_decoder\.bert\.encoder\.layer\.\d+\..*(query|key|value|dense)"


class Blip(Family):
    name = "blip"
    hub_ids = ("Salesforce/blip-image-captioning-base", "Salesforce/blip-image-captioning-large")
    lora = "the text decoder's linears: query, key, value, dense (self- and cross-attention, MLP)"
    cache = "none (BLIP's forward takes no precomputed image features)"
    memory = "base (247M): ~3 GiB fp32 LoRA at batch 8; large (470M): ~5 GiB (estimated from the weights)"
    question_template = "question: {question} answer:"  # BERT's tokenizer lowercases anyway

    @classmethod
    def matches(cls, config: Any) -> bool:
        return getattr(config, "model_type", None) == "blip" and "BlipForConditionalGeneration" in (
            getattr(config, "architectures", None) or ["BlipForConditionalGeneration"]
        )

    def __init__(self, config: Any):
        super().__init__(config)
        text = config.text_config
        self.bos_id, self.pad_id = text.bos_token_id, text.pad_token_id
        self.end_token_ids = frozenset([text.sep_token_id])

    def own_loss(self) -> str | None:
        return "BLIP's text decoder computes its cross-entropy itself, with label smoothing"

    def lora_target_modules(self) -> str:
        return BLIP_TARGETS

    def language_model(self, model: Any) -> Any:
        return unwrap(model).text_decoder

    def frozen_modules(self, groups: Sequence[str]) -> list[str]:
        return ["vision_model"]

    def cache_level(self, groups: Sequence[str], model: Any) -> tuple[str | None, str]:
        return None, "BLIP's forward takes no precomputed image features"

    def encode_batch(
        self,
        processor: Any,
        images: list[list[Image.Image]],
        prompts: Sequence[str],
        targets: Any,
        layout: Layout,
    ) -> dict[str, torch.Tensor]:
        tok = processor.tokenizer
        prompt_ids = [[self.bos_id] + p for p in tok(list(prompts), add_special_tokens=False)["input_ids"]]
        rows, labels = prompt_ids, None
        if targets is not None:
            spans = [
                trained_span(t, self.end_token_id, layout.max_length - len(p))
                for p, t in zip(
                    prompt_ids,
                    tok([t.strip() for t in targets], add_special_tokens=False)["input_ids"],
                    strict=True,
                )
            ]
            rows = [p + s for p, s in zip(prompt_ids, spans, strict=True)]
            labels = [[IGNORE_INDEX] * len(p) + s for p, s in zip(prompt_ids, spans, strict=True)]
        batch = pad_rows(rows, labels, self.pad_id, layout.padding_side)
        pixels = processor.image_processor(only_images(images))["pixel_values"]
        batch["pixel_values"] = torch.as_tensor(np.stack(pixels))
        return batch

    def count_tokens(
        self,
        processor: Any,
        prompt: str,
        target: str,
        history: tuple[tuple[str, str], ...],
        turn_images: tuple[int, ...] = (1,),
    ) -> int:
        tok = processor.tokenizer
        words = [tok(t, add_special_tokens=False)["input_ids"] for t in (prompt, target.strip())]
        return 1 + len(words[0]) + len(words[1]) + 1  # [DEC] prompt target [SEP]

    def generation_groups(self, batch: dict[str, torch.Tensor]) -> list[tuple[list[int], dict[str, Any]]]:
        lengths = batch["attention_mask"].sum(1).tolist()
        groups = []
        for n in sorted(set(lengths)):
            rows = [i for i, length in enumerate(lengths) if length == n]
            sub = {k: v[rows] for k, v in batch.items()}
            for key in ("input_ids", "attention_mask"):  # left padding gone: every row is n long
                sub[key] = sub[key][:, -n:]
            groups.append((rows, sub))
        return groups

    @torch.no_grad()
    def generate_tokens(
        self, model: Any, processor: Any, batch: dict[str, torch.Tensor], **kwargs: Any
    ) -> torch.Tensor:
        """BLIP's own `generate` with the prompt as we built it: the text decoder continues it, cross-attending
        to the ViT's output. (BLIP's `generate` drops the last prompt token and overwrites the first.)"""
        if len(set(batch["attention_mask"].sum(1).tolist())) > 1:
            raise ValueError("BLIP generates rows of one prompt length at a time (see generation_groups)")
        base = unwrap(model)
        image = base.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
        kwargs.setdefault("eos_token_id", sorted(self.end_token_ids))
        kwargs.setdefault("pad_token_id", self.pad_id)
        out = base.text_decoder.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long, device=image.device),
            **kwargs,
        )
        return out[:, batch["input_ids"].shape[1] :]
