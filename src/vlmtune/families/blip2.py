"""BLIP-2: a frozen ViT, a Q-Former over learned query tokens, a projection, and a language model (OPT here;
Flan-T5 in `blip2_t5.py`).

The token sequence the language model sees, for one example (decoder-only; see `_text.py` for T5):

    <image> x num_query_tokens | BOS | prompt tokens | target tokens | EOS | padding
    ---------- label -100 -------------------------  | trained ------------ | -100

The processor puts the image placeholders first; the model swaps their embeddings for the Q-Former's output
(transformers >= 4.47 finds the image by these placeholders alone, so text tokenised without them trains a
model that never sees the image). BLIP-2 OPT ends a caption with "\\n" (id 50118), its config's
`eos_token_id`, not with the tokenizer's `</s>`; generation stops on the same id.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ._text import assemble, end_tokens, lora_targets, target_text
from .base import IGNORE_INDEX, Family, Layout, only_images, unwrap

# What each trainable group trains in full (peft `modules_to_save`).
GROUP_MODULES = {"qformer": ["qformer"], "projection": ["language_projection"]}


class Blip2(Family):
    name = "blip-2"
    hub_ids = ("Salesforce/blip2-opt-2.7b", "Salesforce/blip2-opt-6.7b", "Salesforce/blip2-opt-2.7b-coco")
    groups = {
        "qformer": "the Q-Former (its queries stay as they are)",
        "projection": "the language projection",
    }
    lora = "every OPT linear: q_proj, k_proj, v_proj, out_proj, fc1, fc2"
    cache = "ViT + Q-Former + projection output; the ViT's alone when a group trains"
    memory = "OPT-2.7B: ~10 GiB bf16 LoRA, ~7.6 GiB QLoRA (batch 8, measured on an H200)"
    encoder_decoder = False  # OPT; Flan-T5's subclass says True
    lm_types: tuple[str, ...] = ("opt",)

    @classmethod
    def matches(cls, config: Any) -> bool:
        text = getattr(config, "text_config", None)
        return (
            getattr(config, "model_type", None) == "blip-2"
            and getattr(text, "model_type", None) in cls.lm_types
            and bool(config.use_decoder_only_language_model) != cls.encoder_decoder
        )

    def __init__(self, config: Any):
        super().__init__(config)
        self.image_token_id: int = config.image_token_id
        self.num_query_tokens: int = config.num_query_tokens
        self.end_token_ids = end_tokens(config.text_config)
        if self.image_token_id is None:
            raise ValueError(
                "This BLIP-2 config has no image_token_index: it predates transformers 4.47. Load the current "
                "revision of the checkpoint (the hub's main branch has it)."
            )

    def own_loss(self) -> str | None:
        return "T5 computes its decoder's loss itself" if self.encoder_decoder else None

    def lora_target_modules(self) -> str:
        return lora_targets(self.config.text_config, self.name)

    def language_model(self, model: Any) -> Any:
        return unwrap(model).language_model

    def group_modules(self, group: str) -> list[str]:
        return GROUP_MODULES[group]

    def frozen_modules(self, groups: Sequence[str]) -> list[str]:
        return ["vision_model"] + ([] if "qformer" in groups else ["qformer"])

    def cache_level(self, groups: Sequence[str], model: Any) -> tuple[str | None, str]:
        # transformers >= 5.24's forward takes precomputed encoder outputs (`mm_encoder_outputs`).
        if "mm_encoder_outputs" not in inspect.signature(type(unwrap(model)).forward).parameters:
            return None, "this transformers version cannot take precomputed image features (needs >= 5.24)"
        if groups:
            return (
                "vision",
                f"--train-modules {' '.join(groups)}: the frozen vision encoder's output is computed once",
            )
        return "projection", "vision side frozen: image features computed once and reused every epoch"

    # --- inputs -----------------------------------------------------------------------------------------

    @property
    def trains_history(
        self,
    ) -> bool:  # a decoder-only language model reads the whole dialogue as one sequence
        return not self.encoder_decoder

    def encode_batch(
        self,
        processor: Any,
        images: list[list[Image.Image]],
        prompts: Sequence[str],
        targets: Any,
        layout: Layout,
    ) -> dict[str, torch.Tensor]:
        """Inputs, and with `targets` the labels, for a batch: `input_ids`, `attention_mask`, `labels` (B, T)
        long; `pixel_values` (B, 3, H, W). A dialogue reads: image tokens, the first prompt, then each reply
        and its end token followed by the next prompt, then the target."""
        # The processor is called with images and text together: that is what inserts the placeholders.
        enc = processor(
            images=only_images(images), text=_first_prompts(prompts, layout.history), padding=False
        )
        batch = self._assemble(processor.tokenizer, enc["input_ids"], prompts, targets, layout)
        batch.update(self.text_inputs(processor, prompts))
        batch["pixel_values"] = torch.as_tensor(np.stack(enc["pixel_values"]))
        return batch

    def encode_text_batch(
        self, processor: Any, prompts: Sequence[str], targets: Sequence[str], layout: Layout
    ) -> dict[str, torch.Tensor]:
        # The processor's layout, rebuilt without decoding an image: placeholders, then the tokenised prompt
        # (with the tokenizer's own special tokens). A test checks it against `encode` token for token.
        placeholders = [self.image_token_id] * self.num_query_tokens
        firsts = processor.tokenizer(_first_prompts(prompts, layout.history))["input_ids"]
        ids = [placeholders + p for p in firsts]
        batch = self._assemble(processor.tokenizer, ids, prompts, targets, layout)
        batch.update(self.text_inputs(processor, prompts))
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
        # with the tokenizer's own special tokens, as the processor adds them
        first = tok(_first_prompts([prompt], [history])[0])["input_ids"]
        rest, _ = self._continuation(tok, history, prompt, True)
        target_ids = tok(target_text(prompt, target, self.encoder_decoder), add_special_tokens=False)[
            "input_ids"
        ]
        # A decoder-only model spends the budget on the whole sequence; an encoder-decoder one on each side
        # apart, and only the decoder's side (the target) is ever cut.
        spent = len(target_ids) + 1
        return spent if self.encoder_decoder else len(first) + len(rest) + spent

    def text_inputs(self, processor: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Text inputs beside the language model's (none for BLIP-2: its Q-Former reads no text)."""
        return {}

    def _continuation(
        self, tokenizer: Any, history: tuple[tuple[str, str], ...], prompt: str, train: bool
    ) -> tuple[list[int], list[int]]:
        """The tokens after the first prompt of a dialogue, up to the target: each earlier reply and its end
        token (trained with `train`), then the next prompt (never trained); with their labels."""
        ids: list[int] = []
        labels: list[int] = []
        later = [p for p, _ in history[1:]] + [prompt] if history else []
        for (asked, reply), nxt in zip(history, later, strict=True):
            said = tokenizer(target_text(asked, reply, False), add_special_tokens=False)["input_ids"]
            said = said + [self.end_token_id]
            ids += said
            labels += said if train else [IGNORE_INDEX] * len(said)
            question = tokenizer(nxt, add_special_tokens=False)["input_ids"] if nxt else []
            ids += question
            labels += [IGNORE_INDEX] * len(question)
        return ids, labels

    def _assemble(self, tokenizer, prompt_ids, prompts, targets, layout: Layout):
        prompt_ids, prompt_labels = [list(ids) for ids in prompt_ids], []
        for k, h in enumerate(layout.history):
            rest, labels = self._continuation(tokenizer, h, prompts[k], layout.train_history)
            prompt_labels.append([IGNORE_INDEX] * len(prompt_ids[k]) + labels)
            prompt_ids[k] += rest
        for ids in prompt_ids:
            n_image = sum(1 for i in ids if i == self.image_token_id)
            if n_image != self.num_query_tokens:
                raise ValueError(
                    f"The processor inserted {n_image} image tokens but the model has {self.num_query_tokens} "
                    "query tokens: processor and model come from different checkpoints."
                )
        target_ids = None
        if targets is not None:
            texts = [target_text(p, t, self.encoder_decoder) for p, t in zip(prompts, targets, strict=True)]
            target_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return assemble(
            prompt_ids,
            target_ids,
            encoder_decoder=self.encoder_decoder,
            end_id=self.end_token_id,
            pad_id=tokenizer.pad_token_id,
            max_length=layout.max_length,
            image_tokens=self.num_query_tokens,
            padding_side=layout.padding_side,
            prompt_labels=prompt_labels,
        )

    def loss_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Logits only from the position before the batch's first target token on: the image placeholders and
        prompt carry no label, so their logits (T x vocab each, in fp32 for the loss) are never computed.

        BLIP-2 scores `logits[:, -labels.size(1):]` against the labels shifted by one, so the labels are cut to
        the same last positions; the loss is the same (a test checks it), for less memory and compute. (An
        encoder-decoder language model has labels for its decoder alone: nothing to trim.)
        """
        labels = batch["labels"]
        targets = labels != IGNORE_INDEX
        if self.encoder_decoder or not targets.any():
            return batch
        first = int(targets.any(dim=0).int().argmax())  # the earliest position with a target in any row
        start = max(first - 1, 0)  # the logit there predicts the token at `first`
        return {**batch, "labels": labels[:, start:], "logits_to_keep": labels.shape[1] - start}

    def vllm_prompt_ids(
        self,
        processor: Any,
        prompts: Sequence[str],
        history: Any = None,
        turn_images: Any = None,
        max_length: int = 512,
    ) -> list[list[int]]:
        if self.encoder_decoder:  # vLLM's BLIP-2 runs a decoder-only language model
            return super().vllm_prompt_ids(processor, prompts, history, turn_images, max_length)
        batch = self.encode_text(
            processor, prompts, None, max_length=max_length, padding_side="right", history=history,
            turn_images=turn_images,
        )  # fmt: skip
        # vLLM's BLIP-2 processor inserts the query placeholders at the start, as transformers' does
        return [
            [t for t, kept in zip(ids, mask, strict=True) if kept and t != self.image_token_id]
            for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), strict=True)
        ]

    @property
    def packable(self) -> tuple[str, ...] | None:  # OPT takes position_ids and a 4D mask through the forward
        return None if self.encoder_decoder else ("pixel_values", "image_index")

    # --- the image-feature cache -----------------------------------------------------------------------

    def image_features(self, model: Any, batch: dict[str, Any], upto: str = "projection") -> torch.Tensor:
        """ViT -> Q-Former -> language projection: (B, 3, H, W) pixels -> (B, num_query_tokens, d_lm); up to
        "vision", the ViT's last hidden state alone: (B, 1 + patches, d_vision)."""
        pixel_values = batch["pixel_values"]
        if upto == "vision":
            return unwrap(model).vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        out = model.get_image_features(pixel_values=pixel_values, return_dict=True)
        return out if torch.is_tensor(out) else out.pooler_output

    def cached_inputs(
        self, features: torch.Tensor, model: Any = None, upto: str = "projection", batch: Any = None
    ) -> dict[str, Any]:
        if upto == "vision":  # the Q-Former and projection run on the cached ViT output
            features = self.after_vision(unwrap(model), features, batch)
        return {"pixel_values": None, "mm_encoder_outputs": {"image": _qformer_outputs(features)}}

    def after_vision(self, base: Any, image_embeds: torch.Tensor, batch: Any) -> torch.Tensor:
        """Steps 2 and 3 of `get_image_features` (Q-Former over the query tokens, cross-attending to the image,
        then the language projection), from step 1's output. When the Q-Former trains, peft's
        `modules_to_save` wrapper stands in `base.qformer` and routes to the trainable copy."""
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query = base.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = base.qformer(
            query_embeds=query, encoder_hidden_states=image_embeds, encoder_attention_mask=mask
        )[0]
        return base.language_projection(out.to(image_embeds.dtype))  # the Q-Former is kept in fp32

    # --- generation -------------------------------------------------------------------------------------


def _first_prompts(prompts: Sequence[str], history: Sequence[tuple[tuple[str, str], ...]]) -> list[str]:
    """What the processor reads beside the image: a dialogue's first prompt (the rest is appended as tokens)."""
    return [h[0][0] if h else p for p, h in zip(prompts, history, strict=True)]


def _qformer_outputs(features: torch.Tensor) -> Any:
    """Projected image features in the output type the BLIP family's forward takes as `mm_encoder_outputs`."""
    from transformers.models.blip_2.modeling_blip_2 import BaseModelOutputWithVisionQformerOutputs

    return BaseModelOutputWithVisionQformerOutputs(pooler_output=features)
