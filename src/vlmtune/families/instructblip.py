"""InstructBLIP: BLIP-2's architecture with an instruction-aware Q-Former. The prompt goes twice: to the
language model after the image tokens (as in BLIP-2), and to the Q-Former as `qformer_input_ids` (BERT
tokens), so the queries pick what the instruction asks about. Language models: Vicuna (LLaMA) or Flan-T5;
the sequence layouts are those of `_text.py`.

Since the Q-Former reads the text, what it hands on depends on the prompt: only the vision encoder's output
is text-free, so that is what the image-feature cache holds; the Q-Former and projection run at each step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import pad_rows
from .blip2 import Blip2


class InstructBlip(Blip2):
    name = "instructblip"
    hub_ids = (
        "Salesforce/instructblip-flan-t5-xl",
        "Salesforce/instructblip-vicuna-7b",
        "Salesforce/instructblip-flan-t5-xxl",
        "Salesforce/instructblip-vicuna-13b",
    )
    caption_prompt = "A short image caption:"  # InstructBLIP is trained on instructions, not on bare images
    lora = "every language-model linear (Vicuna: q/k/v/o_proj, gate/up/down_proj; T5: q, k, v, o, wi_*, wo)"
    cache = "the ViT's output (the Q-Former reads the instruction, so it runs each step)"
    memory = (
        "Vicuna-7B: ~18 GiB bf16 LoRA, ~8 GiB QLoRA; Flan-T5-XL: ~10 GiB bf16 (estimated from the weights)"
    )
    lm_types = ("opt", "llama", "t5")

    @classmethod
    def matches(cls, config: Any) -> bool:
        text = getattr(config, "text_config", None)
        return (
            getattr(config, "model_type", None) == "instructblip"
            and getattr(text, "model_type", None) in cls.lm_types
        )

    def __init__(self, config: Any):
        super().__init__(config)
        self.encoder_decoder = not config.use_decoder_only_language_model

    def cache_level(self, groups: Sequence[str], model: Any) -> tuple[str | None, str]:
        level, why = super().cache_level(groups, model)
        if level is None:
            return level, why
        return (
            "vision",
            "the Q-Former reads the instruction: the frozen vision encoder's output is computed once",
        )

    def loss_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        # InstructBLIP's forward scores all logits against all labels: nothing may be trimmed.
        return batch

    def text_inputs(self, processor: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The instruction as the Q-Former reads it (BERT tokens), right-padded: its attention mask hides
        the padding."""
        ids = processor.qformer_tokenizer(list(prompts))["input_ids"]
        batch = pad_rows(ids, None, processor.qformer_tokenizer.pad_token_id, "right")
        return {"qformer_input_ids": batch["input_ids"], "qformer_attention_mask": batch["attention_mask"]}

    def image_features(self, model: Any, batch: dict[str, Any], upto: str = "projection") -> torch.Tensor:
        return super().image_features(model, batch, "vision")  # nothing later is text-free

    def after_vision(self, base: Any, image_embeds: torch.Tensor, batch: Any) -> torch.Tensor:
        """`InstructBlipForConditionalGeneration.get_image_features` from the ViT's output: the Q-Former reads
        the query tokens and the instruction, cross-attending to the image; its query outputs are projected."""
        ids, text_mask = batch.pop("qformer_input_ids"), batch.pop("qformer_attention_mask")
        query = base.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_mask = torch.ones(query.shape[:-1], dtype=torch.long, device=image_embeds.device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = base.qformer(
            input_ids=ids,
            attention_mask=torch.cat([query_mask, text_mask.to(query_mask.device)], dim=1),
            query_embeds=query,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        )[0][:, : query.shape[1]]
        return base.language_projection(out.to(image_embeds.dtype))

    def cached_inputs(
        self, features: torch.Tensor, model: Any = None, upto: str = "projection", batch: Any = None
    ) -> dict[str, Any]:
        inputs = super().cached_inputs(features, model, "vision", batch)
        return {**inputs, "qformer_input_ids": None}
