"""Gemma 3 (4B, 12B, 27B): a SigLIP vision tower at 896 x 896, average-pooled to 256 tokens a image, a linear
projector, and a Gemma 3 language model whose image tokens attend to each other both ways.

The chat template writes `<start_of_image>` where the image goes; the processor expands it into a blank line,
`<start_of_image>`, 256 `<image_soft_token>`s, `<end_of_image>` and a blank line. `token_type_ids` (1 on the
image tokens) tells the model which tokens make one image's bidirectional block; a reply ends with
`<end_of_turn>`, and the template writes `<bos>` itself.
"""

from __future__ import annotations

from typing import Any

import torch

from ._chat import ChatFamily


class Gemma3(ChatFamily):
    name = "gemma-3"
    model_types = ("gemma3",)
    hub_ids = ("google/gemma-3-4b-it", "google/gemma-3-12b-it", "google/gemma-3-27b-it")
    groups = {
        "projector": "the multimodal projector (pooled SigLIP features -> language width)",
        "vision": "the SigLIP vision tower",
    }
    cache = "vision tower + projector output, when neither trains"
    memory = "gemma-3-4b-it: ~12 GiB bf16 LoRA at batch 4 (estimate, not measured)"
    image_token = "<start_of_image>"
    end_of_turn = "<end_of_turn>"

    def fixed_image_tokens(self) -> bool:
        return True  # every image resized to one size, pooled to mm_tokens_per_image

    def token_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"token_type_ids": (input_ids == self.image_token_id).long()}

    def image_token_count(self, image_inputs: dict[str, Any]) -> int:
        return int(self.config.mm_tokens_per_image) * int(image_inputs["pixel_values"].shape[0])
