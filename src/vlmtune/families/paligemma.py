"""PaliGemma and PaliGemma 2: a SigLIP vision tower (224, 448 or 896 pixels), a linear projector and a Gemma
(PaliGemma 2: Gemma 2) language model, trained as a prefix-LM.

The sequence, as big_vision lays it out and transformers' processor builds it:

    <image> x num_image_tokens | <bos> | prefix | "\\n" | suffix | <eos> | padding
    ------------------- prefix: attends both ways ---  | causal -------- |
    ----------------------- label -100 -------------  | trained ------- | -100

The prefix is a task prompt ("caption en", "answer en What is ...?"): no chat template. `token_type_ids`
marks the suffix (1), so the model lets the image and prefix attend to each other both ways and the suffix
only causally; generation marks each new token 1 itself. A pretrained (`-pt`) checkpoint is meant to be
fine-tuned this way; the `-mix` ones already follow the task prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ._text import assemble, end_tokens
from ._vlm import TransformersVLM
from .base import IGNORE_INDEX, Layout, only_images, require_image_tokens


class PaliGemma(TransformersVLM):
    name = "paligemma"
    model_types = ("paligemma",)
    hub_ids = ("google/paligemma2-3b-pt-224", "google/paligemma2-3b-mix-224", "google/paligemma-3b-pt-224")
    groups = {
        "projector": "the linear projector (SigLIP features -> language width)",
        "vision": "the SigLIP vision tower",
    }
    caption_prompt = "caption en"
    question_template = "answer en {question}"
    cache = "vision tower + projector output, when neither trains"
    memory = "paligemma2-3b-224: ~10 GiB bf16 LoRA at batch 4 (estimate, not measured)"

    def __init__(self, config: Any):
        super().__init__(config)
        self.image_token_id: int = config.image_token_id
        self.num_image_tokens: int = config.text_config.num_image_tokens
        self.end_token_ids = end_tokens(config.text_config)

    def logit_softcap(self, config: Any) -> float | None:
        return getattr(config.get_text_config(), "final_logit_softcapping", None)  # Gemma 2's 30

    def fixed_image_tokens(self) -> bool:
        return True  # every image resized to the tower's size: num_image_tokens each

    # --- inputs -------------------------------------------------------------------------------------------

    def encode_batch(
        self,
        processor: Any,
        images: list[list[Image.Image]],
        prompts: Sequence[str],
        targets: Any,
        layout: Layout,
    ) -> dict[str, torch.Tensor]:
        """`input_ids`, `attention_mask`, `token_type_ids` (1 on the suffix), `pixel_values` (and `labels`:
        the suffix and `<eos>`) for a batch; the processor writes the image tokens, `<bos>` and the "\\n"."""
        tok = processor.tokenizer
        text = [processor.image_token + prompt for prompt in prompts]
        enc = processor(images=only_images(images), text=text, padding=False)
        rows = [list(ids) for ids in enc["input_ids"]]
        for ids in rows:
            require_image_tokens(ids, self.image_token_id, self.num_image_tokens)
        target_ids = None
        if targets is not None:
            target_ids = [tok(t.strip(), add_special_tokens=False)["input_ids"] for t in targets]
        batch = assemble(
            rows,
            target_ids,
            encoder_decoder=False,
            end_id=self.end_token_id,
            pad_id=tok.pad_token_id,
            max_length=layout.max_length,
            image_tokens=self.num_image_tokens,
            padding_side=layout.padding_side,
        )
        # the suffix is what trains: nothing else, so the labels say where it is
        trained = (
            batch["labels"] != IGNORE_INDEX if "labels" in batch else torch.zeros_like(batch["input_ids"])
        )
        batch["token_type_ids"] = trained.long()
        batch["pixel_values"] = torch.as_tensor(np.stack(enc["pixel_values"]))
        return batch

    def count_tokens(
        self,
        processor: Any,
        prompt: str,
        target: str,
        history: tuple[tuple[str, str], ...],
        turn_images: tuple[int, ...] = (1,),
    ) -> int:
        tok = processor.tokenizer
        prefix = tok(tok.bos_token + prompt + "\n", add_special_tokens=False)["input_ids"]
        return len(prefix) + len(tok(target.strip(), add_special_tokens=False)["input_ids"]) + 1
