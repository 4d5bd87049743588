"""What most of transformers' vision-language classes share (LLaVA, Gemma 3, PaliGemma, InternVL, ...): a
`model.vision_tower`, a `model.multi_modal_projector` and a `model.language_model` with LLaMA's projection
names, one `model_type` per checkpoint kind, and a forward that takes the projected image features instead of
pixels (`mm_encoder_outputs`). A family built on it says only how an example is laid out, and where its
modules are named otherwise.

The image-feature cache: the projected features of an example's images, computed once, replace its pixels.
Every forward here scatters them, token after token, into the image placeholders, so an example's features are
kept as one (tokens, width) run, its images' tokens in order, whatever its images, tiles or grid. The text side
is laid out by `encode` itself with stand-in images: where every image gives the same number of tokens
(LLaVA-1.5, Gemma 3, PaliGemma) any small image; where the count follows the image's size (tiles, dynamic
resolution) a blank image of that size, which the processor tiles or resizes exactly as it did the real one.
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
        """Whether every image gives the model the same number of tokens (then any stand-in image will do)."""
        return False

    pooled_per_image = False  # the forward takes its features as a list of tensors (LLaVA's, Qwen's)
    #: processor outputs the forward still reads beside cached features (Qwen's grids: its 3-D positions)
    kept_with_features: tuple[str, ...] = ()

    def stand_in_size(self, processor: Any, width: int, height: int) -> tuple[int, int]:
        """The size of a blank image that gives the same tokens as an image of this size (itself, unless the
        family knows a smaller one)."""
        return width, height

    def cache_level(self, groups: Sequence[str], model: Any) -> tuple[str | None, str]:
        if "mm_encoder_outputs" not in inspect.signature(type(unwrap(model)).forward).parameters:
            return None, f"{type(unwrap(model)).__name__}'s forward takes no precomputed image features"
        if groups:
            return None, f"--train-modules {' '.join(groups)}: the image side trains, so its features change"
        return "projection", "vision side frozen: image features computed once and reused every epoch"

    def image_features(
        self, model: Any, batch: dict[str, Any], upto: str = "projection"
    ) -> list[torch.Tensor]:
        """The vision tower then the projector, over the batch's image inputs (pixels, and the grids, sizes
        or masks the family's processor gives): per example, its images' features as one (tokens, ...) run,
        as many tokens as its placeholders."""
        inner = unwrap(model).model
        takes = inspect.signature(inner.get_image_features).parameters
        out = inner.get_image_features(**{k: v for k, v in batch.items() if k in takes}, return_dict=True)
        per_example = (batch["input_ids"] == self.image_token_id).sum(dim=1).tolist()
        return list(self.flat_features(out).split(per_example))

    def flat_features(self, out: Any) -> torch.Tensor:
        """`get_image_features`' output as (tokens, ...) rows, in the order the placeholders take them."""
        pooled = out.pooler_output
        pooled = list(pooled) if isinstance(pooled, (list, tuple)) else [pooled]
        return torch.cat([p.reshape(-1, p.shape[-1]) for p in pooled])

    def encoder_outputs(self, rows: torch.Tensor) -> Any:
        """`flat_features`' rows as the forward takes them in `mm_encoder_outputs["image"]`."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        # the forward checks only the count of values and scatters them in order: any shape will do
        return BaseModelOutputWithPooling(pooler_output=[rows] if self.pooled_per_image else rows)

    def cached_inputs(
        self, features: Any, model: Any = None, upto: str = "projection", batch: Any = None
    ) -> dict[str, Any]:
        rows = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])  # the batch's, example after example
        return {"mm_encoder_outputs": {"image": self.encoder_outputs(rows)}}

    def encode_text_batch(
        self, processor: Any, prompts: Sequence[str], targets: Sequence[str], layout: Layout
    ) -> dict[str, torch.Tensor]:
        # `encode` with stand-in images that give the same ids; their pixels are dropped
        sizes = layout.image_sizes
        if self.fixed_image_tokens() or sizes is None:
            sizes = [[(64, 64)] * sum(turns) for turns in layout.turn_images]
        stand_in = [[Image.new("RGB", self.stand_in_size(processor, *size)) for size in row] for row in sizes]
        batch = self.encode_batch(processor, stand_in, prompts, targets, layout)
        for name in {"pixel_values", *processor.image_processor.model_input_names} - set(
            self.kept_with_features
        ):
            batch.pop(name, None)
        return batch
