"""What every model family tells vlmtune. One file per family implements it; nothing else knows its quirks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

IGNORE_INDEX = -100  # label value that the cross-entropy loss skips


class Family(ABC):
    """A family of image-to-text models (BLIP-2, InstructBLIP, LLaVA, ...).

    Everything that differs between families lives behind this interface: how a prompt looks, where the
    image goes in the token sequence, how labels are masked, which modules LoRA targets and what stays frozen.
    """

    name: str
    eos_token_id: int  # the token a target ends with, and generation stops on
    question_template: str = "Question: {question} Answer:"

    def __init__(self, config: Any):
        self.config = config  # the model's transformers config; a family instance serves one model

    @classmethod
    @abstractmethod
    def matches(cls, config: Any) -> bool:
        """Whether a transformers config belongs to this family."""

    @abstractmethod
    def lora_target_modules(self) -> str:
        """peft `target_modules` (a regex over module names) for the default LoRA placement."""

    @abstractmethod
    def extra_trainable_modules(self, train_qformer: bool, train_projection: bool) -> list[str]:
        """Module names trained in full next to LoRA (peft `modules_to_save`)."""

    @abstractmethod
    def frozen_modules(self, train_qformer: bool, train_projection: bool) -> list[str]:
        """Modules with no trainable weight at all: kept in eval mode during training (no dropout noise)."""

    @abstractmethod
    def encode(
        self,
        processor: Any,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        targets: Sequence[str] | None,
        *,
        max_length: int,
        padding_side: str,
    ) -> dict[str, torch.Tensor]:
        """Model inputs for a batch; with `targets`, also `labels` masked to the target tokens alone."""

    def generation_inputs(
        self,
        processor: Any,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        device: torch.device,
        dtype: torch.dtype,
        max_length: int = 512,
    ) -> dict[str, torch.Tensor]:
        """`encode` without targets, as `generate` takes it: left-padded, on `device`, pixels in `dtype`."""
        batch = self.encode(processor, images, prompts, None, max_length=max_length, padding_side="left")
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        return batch

    def encode_text(
        self,
        processor: Any,
        prompts: Sequence[str],
        targets: Sequence[str],
        *,
        max_length: int,
        padding_side: str,
    ) -> dict[str, torch.Tensor]:
        """`encode` without the images (the same ids and labels), for training on cached image features."""
        raise NotImplementedError(f"{self.name} has no image-feature cache")

    def supports_feature_cache(self, model: Any) -> bool:
        """Whether `model` can take precomputed image features (see `image_features`, `cached_inputs`)."""
        return False

    def image_features(
        self, model: Any, pixel_values: torch.Tensor, upto: str = "projection"
    ) -> torch.Tensor:
        """What the frozen part of the image path hands on, per image: up to `"projection"`, what the language
        model receives in place of the image placeholders; up to `"vision"`, the vision encoder's output alone
        (for when the modules after it train)."""
        raise NotImplementedError(f"{self.name} has no image-feature cache")

    def cached_inputs(
        self, features: torch.Tensor, model: Any = None, upto: str = "projection"
    ) -> dict[str, Any]:
        """Extra forward() arguments that make the model use `features` (from `image_features(..., upto)`)
        instead of computing them; for `"vision"` features the trainable modules after the vision encoder run
        here, on `model`, with gradients."""
        raise NotImplementedError(f"{self.name} has no image-feature cache")

    def loss_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` as the training forward should take it; a family may trim work the loss never reads."""
        return batch

    @abstractmethod
    def generate_tokens(
        self, model: Any, processor: Any, batch: dict[str, torch.Tensor], **kwargs: Any
    ) -> torch.Tensor:
        """The new tokens for `batch` (B, T_new), prompt stripped; rows that stopped early end in padding.
        Keyword arguments go to transformers' `generate` (streamer, stopping criteria, sampling...)."""

    def decode(self, processor: Any, tokens: Sequence[int] | torch.Tensor) -> str:
        """One row of `generate_tokens` as text: special tokens dropped, cut at the end-of-sequence token."""
        ids = tokens.tolist() if torch.is_tensor(tokens) else list(tokens)
        if self.eos_token_id in ids:
            ids = ids[: ids.index(self.eos_token_id)]
        return processor.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def generate(
        self, model: Any, processor: Any, batch: dict[str, torch.Tensor], **kwargs: Any
    ) -> list[str]:
        """Decoded continuations of `batch` (prompt tokens stripped)."""
        return [
            self.decode(processor, row) for row in self.generate_tokens(model, processor, batch, **kwargs)
        ]

    def format_question(self, question: str) -> str:
        return self.question_template.format(question=question.strip())
