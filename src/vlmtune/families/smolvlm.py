"""SmolVLM (and Idefics3, which it grew from): a SigLIP vision model, its patch features pixel-shuffled
(`scale_factor`) through a linear connector into a SmolLM2 (LLaMA-kind) language model.

An image is split into tiles: resized so its longest edge is `size["longest_edge"]`, cut into a grid of
`max_image_size` tiles, plus the whole image downscaled to one tile (the global view); every tile gives
`image_seq_len` `<image>` tokens, so the count varies with the image. The chat template writes one `<image>`;
the processor expands it into, per tile, `<fake_token_around_image><row_R_col_C>` and the tile's `<image>`s,
then `<fake_token_around_image><global-img>`, the global view's and a closing `<fake_token_around_image>`.
Pixels are (1, tiles, 3, H, W) per example with a `pixel_attention_mask`, padded to the batch's most tiles
(the model drops all-zero tiles). The template writes `<|im_start|>` once, then `User:` / `Assistant:` turns,
each ended by `<end_of_utterance>`.
"""

from __future__ import annotations

from typing import Any

from ._chat import ChatFamily
from .base import unwrap


class SmolVLM(ChatFamily):
    name = "smolvlm"
    hub_ids = (
        "HuggingFaceTB/SmolVLM-256M-Instruct",
        "HuggingFaceTB/SmolVLM-500M-Instruct",
        "HuggingFaceTB/SmolVLM-Instruct",
        "HuggingFaceM4/Idefics3-8B-Llama3",
    )
    model_types = ("smolvlm", "idefics3")
    groups = {
        "projector": "the connector (pixel-shuffled SigLIP features -> language width)",
        "vision": "the SigLIP vision model",
    }
    cache = "SigLIP + connector output of every tile, when neither trains"
    memory = "SmolVLM-256M: ~3 GiB bf16 LoRA at batch 4 with image splitting (estimate, not measured)"
    lora = "every language-model linear (under text_model): q/k/v/o_proj, gate/up/down_proj"
    image_token = "<image>"
    end_of_turn = "<end_of_utterance>"
    padded_views = ("pixel_values", "pixel_attention_mask")

    def _tokens_per_tile(self) -> int:
        vision = self.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 // self.config.scale_factor**2

    def image_token_count(self, image_inputs: dict[str, Any]) -> int:
        return self._tokens_per_tile() * int(image_inputs["pixel_values"].shape[1])

    def image_tokens(self, processor: Any, width: int, height: int) -> int:
        tiles, _, _ = processor.image_processor.get_number_of_image_patches(height, width, {})
        # transformers' helper counts 0 for an image left whole (no split): the processor still gives it a tile
        return self._tokens_per_tile() * max(tiles, 1)

    def language_model(self, model: Any) -> Any:
        return unwrap(model).model.text_model

    def lora_target_modules(self) -> str:
        return r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

    def group_modules(self, group: str) -> list[str]:
        return {"projector": ["connector"], "vision": ["vision_model"]}[group]
