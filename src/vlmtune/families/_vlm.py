"""What most of transformers' vision-language classes share (LLaVA, Gemma 3, PaliGemma, InternVL, ...): a
`model.vision_tower`, a `model.multi_modal_projector` and a `model.language_model` with LLaMA's projection
names, one `model_type` per checkpoint kind, and a forward that takes the projected image features instead of
pixels (`mm_encoder_outputs`). A family built on it says only how an example is laid out, and where its
modules are named otherwise.

The image-feature cache: where every image gives the same number of tokens (LLaVA-1.5, Gemma 3, PaliGemma)
the ids of an example do not depend on its image, so the text side is laid out exactly by `encode` with a
stand-in image, and the projected features computed once replace the pixels. Where the count varies with the
image (tiles, dynamic resolution) the layout needs each image's size or grid, which the cache does not keep
yet: those families train from pixels.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from ._text import LORA_TARGETS
from .base import Family, Layout, unwrap


class TransformersVLM(Family):
    model_types: tuple[str, ...] = ()  # the transformers `model_type`s of the family's checkpoints
    lora = "every language-model linear: q/k/v/o_proj, gate/up/down_proj"

    @classmethod
    def matches(cls, config: Any) -> bool:
        return getattr(config, "model_type", None) in cls.model_types

    def language_model(self, model: Any) -> Any:
        return unwrap(model).model.language_model

    def lora_target_modules(self) -> str:
        return LORA_TARGETS["llama"]  # LLaMA's, Gemma's, Qwen's and Mistral's projections share the names

    def group_modules(self, group: str) -> list[str]:
        return {"projector": ["multi_modal_projector"], "vision": ["vision_tower"]}[group]

    # --- the image-feature cache -----------------------------------------------------------------------

    def fixed_image_tokens(self) -> bool:
        """Whether every image gives the model the same number of tokens (so the cache applies)."""
        return False

    pooled_per_image = False  # the forward takes its features as a list of one tensor per image (LLaVA's)

    def cache_level(self, groups: Sequence[str], model: Any) -> tuple[str | None, str]:
        if "mm_encoder_outputs" not in inspect.signature(type(unwrap(model)).forward).parameters:
            return None, f"{type(unwrap(model)).__name__}'s forward takes no precomputed image features"
        if not self.fixed_image_tokens():
            return None, f"{self.name}: the tokens an image gives vary with it (the cache keeps no sizes yet)"
        if groups:
            return None, f"--train-modules {' '.join(groups)}: the image side trains, so its features change"
        return "projection", "vision side frozen: image features computed once and reused every epoch"

    def image_features(
        self, model: Any, pixel_values: torch.Tensor, upto: str = "projection"
    ) -> torch.Tensor:
        """The vision tower then the projector: (B, 3, H, W) -> (B, image tokens, language width)."""
        out = (
            unwrap(model).model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        )
        return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out

    def cached_inputs(
        self, features: torch.Tensor, model: Any = None, upto: str = "projection", batch: Any = None
    ) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        pooled = list(features) if self.pooled_per_image else features
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=pooled)}}

    def encode_text_batch(
        self, processor: Any, prompts: Sequence[str], targets: Sequence[str], layout: Layout
    ) -> dict[str, torch.Tensor]:
        # `encode` with stand-in images: every image gives the same ids, and their pixels are dropped
        stand_in = [[Image.new("RGB", (64, 64))] * sum(turns) for turns in layout.turn_images]
        batch = self.encode_batch(processor, stand_in, prompts, targets, layout)
        for name in {"pixel_values", *processor.image_processor.model_input_names}:
            batch.pop(name, None)
        return batch
