"""InternVL 2.5 / 3 (the `-hf` checkpoints, `InternVLForConditionalGeneration`): an InternViT over 448-pixel
tiles, its patch features pixel-shuffled 2 x 2 (`downsample_ratio` 0.5) through an MLP projector into a Qwen2
language model.

An image is tiled (`crop_to_patches`): the grid of 448-pixel tiles among 1..`max_patches` closest to its
aspect, plus a thumbnail of the whole image when there is more than one tile; every tile gives
`image_seq_length` (256) tokens, so the count varies with the image. The chat template writes
`<IMG_CONTEXT>` where the image goes; the processor expands it into `<img>`, the tiles' `<IMG_CONTEXT>`s and
`</img>`. The tiles of a batch travel as one stack of pixels, split back by the image tokens. A reply ends with
`<|im_end|>`.
"""

from __future__ import annotations

from typing import Any

from ._chat import ChatFamily


class InternVL(ChatFamily):
    name = "internvl"
    hub_ids = ("OpenGVLab/InternVL3-1B-hf", "OpenGVLab/InternVL3-2B-hf", "OpenGVLab/InternVL3-8B-hf")
    model_types = ("internvl",)
    groups = {
        "projector": "the MLP projector (pixel-shuffled InternViT features -> language width)",
        "vision": "the InternViT vision tower",
    }
    cache = "InternViT + projector output of every tile, when neither trains"
    memory = "InternVL3-1B: ~6 GiB bf16 LoRA at batch 4, one tile per image (estimate, not measured)"
    image_token = "<IMG_CONTEXT>"
    end_of_turn = "<|im_end|>"

    def image_token_count(self, image_inputs: dict[str, Any]) -> int:
        return int(self.config.image_seq_length) * int(image_inputs["pixel_values"].shape[0])

    def image_tokens(self, processor: Any, width: int, height: int) -> int:
        tiles = processor.image_processor.get_number_of_image_patches(height, width, {})
        return int(self.config.image_seq_length) * tiles
