"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: a ViT over 14-pixel (Qwen3-VL: 16-pixel) patches at the image's own
resolution, a patch merger (2 x 2 patches -> one token of the language model's width; Qwen3-VL adds deepstack
mergers that feed middle-layer features to the first language-model layers), and a Qwen language model with
3-D rotary positions (time, height, width) for image tokens.

An image gives a variable number of tokens: the image processor resizes it to multiples of patch x merge
within `min_pixels`..`max_pixels` (the processor's `size`: `shortest_edge` / `longest_edge`, in pixels), and
the model fills `grid_t * grid_h * grid_w / merge**2` placeholders `<|image_pad|>` between
`<|vision_start|>` and `<|vision_end|>`. The processor expands the one placeholder the chat template writes;
`image_grid_thw` travels with the batch, since the positions are computed from it (with cached features too).
The conversation is the chat template's (`_chat.py`); a reply ends with `<|im_end|>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._chat import ChatFamily


class QwenVL(ChatFamily):
    name = "qwen-vl"
    hub_ids = (
        "Qwen/Qwen2.5-VL-3B-Instruct",
        "Qwen/Qwen3-VL-2B-Instruct",
        "Qwen/Qwen2-VL-2B-Instruct",
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "Qwen/Qwen3-VL-8B-Instruct",
    )
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    groups = {
        "projector": "the patch merger (vision -> language width)",
        "vision": "the vision tower's patch embedding and blocks",
    }
    cache = "vision tower + merger output (Qwen3-VL: and its deepstack features), when neither trains"
    memory = "Qwen2.5-VL-3B: ~10 GiB bf16 LoRA at batch 4 and 512x512 images (estimate, not measured)"
    image_token = "<|image_pad|>"
    end_of_turn = "<|im_end|>"

    def group_modules(self, group: str) -> list[str]:
        # peft saves whole modules, not a ModuleList: the tower is its patch embedding (Qwen3-VL: and its
        # learnt positions) and each block; Qwen3-VL's projector also its deepstack mergers, one by one
        vision = self.config.vision_config
        blocks = [f"blocks.{i}" for i in range(vision.depth)]
        deepstack = [
            f"deepstack_merger_list.{i}" for i in range(len(getattr(vision, "deepstack_visual_indexes", ())))
        ]
        positions = ["visual.pos_embed"] if self.config.model_type == "qwen3_vl" else []
        return {"projector": ["merger", *deepstack], "vision": ["patch_embed", *positions, *blocks]}[group]

    def frozen_modules(self, groups: Sequence[str]) -> list[str]:
        tower = {
            "vision": ["patch_embed", "pos_embed", "blocks"],
            "projector": ["merger", "deepstack_merger_list"],
        }
        return [m for g, names in tower.items() if g not in groups for m in names]

    pooled_per_image = True
    kept_with_features = ("image_grid_thw",)

    def flat_features(self, out: Any) -> torch.Tensor:
        # Qwen3-VL's deepstack features (middle vision layers' tokens, merged, added to the first language
        # layers' states at the image tokens) are kept beside the last layer's, along the width
        pooled = super().flat_features(out)
        deep = [torch.cat(list(layer)) for layer in getattr(out, "deepstack_features", None) or ()]
        return torch.cat([pooled, *deep], dim=-1)

    def encoder_outputs(self, rows: torch.Tensor) -> Any:
        width = self.config.text_config.hidden_size
        if rows.shape[-1] == width:
            return super().encoder_outputs(rows)
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        pooled, *deep = rows.split(width, dim=-1)
        return BaseModelOutputWithDeepstackFeatures(
            pooler_output=[pooled], deepstack_features=[[d] for d in deep]
        )

    def stand_in_size(self, processor: Any, width: int, height: int) -> tuple[int, int]:
        # already the size the processor resizes it to: the same grid, no resizing work per step
        h, w = self._resized(processor, width, height)
        return w, h

    def token_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        # which tokens are an image's (1; a video's would be 2): the 3-D positions are laid out from them
        return {"mm_token_type_ids": (input_ids == self.image_token_id).long()}

    dynamic_resolution = True

    def set_pixels(self, processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
        size = dict(processor.image_processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels  # the processor's names: a pixel count, not an edge
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        processor.image_processor.size = size

    def pixel_limits(self, processor: Any) -> tuple[int, int]:
        size = processor.image_processor.size
        return int(size["shortest_edge"]), int(size["longest_edge"])  # pixel counts, despite the names

    def _resized(self, processor: Any, width: int, height: int) -> tuple[int, int]:
        """(height, width) the image processor resizes an image of this size to: multiples of patch x merge,
        within its pixel limits."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        images = processor.image_processor
        factor = images.patch_size * images.merge_size
        return smart_resize(height, width, factor, *self.pixel_limits(processor))

    def image_tokens(self, processor: Any, width: int, height: int) -> int:
        images = processor.image_processor
        factor = images.patch_size * images.merge_size
        h, w = self._resized(processor, width, height)
        return (h // factor) * (w // factor)

    def image_token_count(self, image_inputs: dict[str, Any]) -> int:
        merge = self.config.vision_config.spatial_merge_size
        return int(image_inputs["image_grid_thw"].prod(-1).sum()) // merge**2  # (images, 3): t, h, w each
