"""What most of transformers' vision-language classes share (LLaVA, Gemma 3, PaliGemma, InternVL, ...): a
`model.vision_tower`, a `model.multi_modal_projector` and a `model.language_model` with LLaMA's projection
names, and one `model_type` per checkpoint kind. A family built on it says only
how an example is laid out, and where its modules are named otherwise."""

from __future__ import annotations

from typing import Any

from ._text import LORA_TARGETS
from .base import Family, unwrap


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
