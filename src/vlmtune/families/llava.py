"""LLaVA-1.5 and LLaVA-NeXT (1.6): a CLIP ViT-L/14 at 336 pixels, its second-to-last layer's patch features
(the class token dropped) through a two-layer MLP projector into a Vicuna, Mistral or other LLaMA-kind
language model.

LLaVA-1.5 gives every image (resized and cropped to 336 x 336) 576 tokens. LLaVA-NeXT's "anyres" tiles an
image at the grid among `image_grid_pinpoints` that fits it best: a base view of the whole image, then the
tiles' patches unpadded back to the image's aspect and a learnt newline after each row, so the count varies
with the image's size (`image_sizes` travels with the batch). The processor expands the one `<image>` the
chat template writes. LLaVA-1.5's template ("USER: <image>\\n... ASSISTANT: ...") ends no reply, so vlmtune
ends each with `</s>`, as LLaVA was trained; LLaVA-NeXT's writes `</s>` itself.
"""

from __future__ import annotations

from typing import Any

from ._chat import ChatFamily


class Llava(ChatFamily):
    name = "llava"
    hub_ids = ("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-v1.6-mistral-7b-hf", "llava-hf/llava-1.5-13b-hf")
    model_types = ("llava", "llava_next")
    groups = {
        "projector": "the MLP projector (CLIP features -> language width)",
        "vision": "the CLIP vision tower",
    }
    cache = "CLIP + projector output (LLaVA-NeXT: of every tile, packed), when neither trains"
    memory = "llava-1.5-7b: ~18 GiB bf16 LoRA at batch 4, ~8 GiB as QLoRA (estimates, not measured)"
    image_token = "<image>"
    end_of_turn = "</s>"
    padded_views = ("pixel_values",)  # LLaVA-NeXT's (1, views, 3, H, W); 1.5's (1, 3, H, W) pads nothing

    def _features_per_view(self) -> tuple[int, int]:
        """(patches per side of one view, tokens besides them: the class token where it is kept)."""
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, int(self.config.vision_feature_select_strategy == "full")

    pooled_per_image = True

    def fixed_image_tokens(self) -> bool:
        return self.config.model_type == "llava"  # NeXT's anyres tiles vary with the image

    def image_token_count(self, image_inputs: dict[str, Any]) -> int:
        side, extra = self._features_per_view()
        if self.config.model_type == "llava":
            return (side * side + extra) * len(image_inputs["pixel_values"])
        return sum(self._anyres_tokens(int(h), int(w)) for h, w in image_inputs["image_sizes"])

    def _anyres_tokens(self, height: int, width: int) -> int:
        """LLaVA-NeXT's count, as its model packs the features: the base view, then the tile grid's patches
        with the padding the image did not fill removed, and one newline per remaining row."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        side, extra = self._features_per_view()
        size = self.config.vision_config.image_size
        rows, cols = get_anyres_image_grid_shape((height, width), self.config.image_grid_pinpoints, size)
        h, w = rows * side, cols * side
        if width / height > w / h:  # wider than the grid: rows of padding above and below
            h -= 2 * ((h - int(round(height * (w / width), 7))) // 2)
        else:
            w -= 2 * ((w - int(round(width * (h / height), 7))) // 2)
        return side * side + extra + h * (w + 1)

    def image_tokens(self, processor: Any, width: int, height: int) -> int | None:
        return self._anyres_tokens(height, width) if self.config.model_type == "llava_next" else None
