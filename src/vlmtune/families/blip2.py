"""BLIP-2 (ViT + Q-Former + a decoder-only language model such as OPT).

The token sequence the language model sees, for one example:

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

from .base import IGNORE_INDEX, Family

# Linear layers of OPT-style decoders: attention projections and the two MLP layers. The regex is anchored
# under `language_model` because the vision encoder also names its MLP `fc1`/`fc2`.
OPT_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"


class Blip2(Family):
    name = "blip-2"

    @classmethod
    def matches(cls, config: Any) -> bool:
        return getattr(config, "model_type", None) == "blip-2"

    def __init__(self, config: Any):
        super().__init__(config)
        text = config.text_config
        if not config.use_decoder_only_language_model:
            raise NotImplementedError(
                f"BLIP-2 with an encoder-decoder language model ({text.model_type}) is not supported yet; "
                "use a BLIP-2 OPT checkpoint such as Salesforce/blip2-opt-2.7b."
            )
        if text.model_type != "opt":
            raise NotImplementedError(f"BLIP-2 with a {text.model_type} language model is not supported yet.")
        self.image_token_id: int = config.image_token_id
        self.num_query_tokens: int = config.num_query_tokens
        self.eos_token_id: int = text.eos_token_id
        if self.image_token_id is None:
            raise ValueError(
                "This BLIP-2 config has no image_token_index: it predates transformers 4.47. Load the current "
                "revision of the checkpoint (the hub's main branch has it)."
            )

    def lora_target_modules(self) -> str:
        return OPT_TARGETS

    def extra_trainable_modules(self, train_qformer: bool, train_projection: bool) -> list[str]:
        return [
            name for name, on in (("qformer", train_qformer), ("language_projection", train_projection)) if on
        ]

    def frozen_modules(self, train_qformer: bool, train_projection: bool) -> list[str]:
        return ["vision_model"] + ([] if train_qformer else ["qformer"])

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
        """Inputs, and with `targets` the labels, for a batch.

        Args:
            images: RGB images, one per example.
            prompts: text before the target ("" for plain captioning, "Question: ... Answer:" for VQA).
            targets: what the model should learn to say, or None at generation time.
            max_length: most text tokens per example (BOS, prompt, target, EOS); image placeholders not counted.
                A target cut short by it gets no EOS, so the model never learns to stop mid-sentence.
            padding_side: "right" for training, "left" for batched generation.

        Returns:
            `input_ids`, `attention_mask`, `labels` (with targets): (B, T) long; `pixel_values`: (B, 3, H, W).
        """
        # The processor is called with images and text together: that is what inserts the placeholders.
        enc = processor(images=list(images), text=list(prompts), padding=False)
        batch = self._assemble(
            processor.tokenizer, enc["input_ids"], prompts, targets, max_length, padding_side
        )
        batch["pixel_values"] = torch.as_tensor(np.stack(enc["pixel_values"]))
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
        # The processor's layout, rebuilt without decoding an image: placeholders, then the tokenised prompt
        # (BOS first). A test checks it against `encode` token for token.
        placeholders = [self.image_token_id] * self.num_query_tokens
        ids = [placeholders + p for p in processor.tokenizer(list(prompts))["input_ids"]]
        return self._assemble(processor.tokenizer, ids, prompts, targets, max_length, padding_side)

    def _assemble(
        self, tokenizer, prompt_ids, prompts, targets, max_length, padding_side
    ) -> dict[str, torch.Tensor]:
        target_ids = (
            tokenizer(
                [_target_text(p, t) for p, t in zip(prompts, targets, strict=True)], add_special_tokens=False
            )["input_ids"]
            if targets is not None
            else [[] for _ in prompts]
        )
        rows, labels = [], []
        for ids, tgt in zip(prompt_ids, target_ids, strict=True):
            n_image = sum(1 for i in ids if i == self.image_token_id)
            if n_image != self.num_query_tokens:
                raise ValueError(
                    f"The processor inserted {n_image} image tokens but the model has {self.num_query_tokens} "
                    "query tokens: processor and model come from different checkpoints."
                )
            room = max_length - (len(ids) - n_image)
            if targets is not None:
                if room < 1:
                    raise ValueError(f"The prompt alone takes {len(ids) - n_image} tokens; raise max_length.")
                tgt = tgt + [self.eos_token_id] if len(tgt) < room else tgt[:room]
            rows.append(ids + tgt)
            labels.append([IGNORE_INDEX] * len(ids) + tgt)
        batch = _pad(rows, labels, tokenizer.pad_token_id, padding_side)
        if targets is None:
            del batch["labels"]
        return batch

    def loss_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Logits only from the position before the batch's first target token on: the image placeholders and
        prompt carry no label, so their logits (T x vocab each, in fp32 for the loss) are never computed.

        BLIP-2 scores `logits[:, -labels.size(1):]` against the labels shifted by one, so the labels are cut to
        the same last positions; the loss is the same (a test checks it), for less memory and compute.
        """
        labels = batch["labels"]
        targets = labels != IGNORE_INDEX
        if not targets.any():
            return batch
        first = int(targets.any(dim=0).int().argmax())  # the earliest position with a target in any row
        start = max(first - 1, 0)  # the logit there predicts the token at `first`
        return {**batch, "labels": labels[:, start:], "logits_to_keep": labels.shape[1] - start}

    def supports_feature_cache(self, model: Any) -> bool:
        # transformers >= 5.24's forward takes precomputed encoder outputs (`mm_encoder_outputs`).
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return "mm_encoder_outputs" in inspect.signature(type(base).forward).parameters

    def image_features(
        self, model: Any, pixel_values: torch.Tensor, upto: str = "projection"
    ) -> torch.Tensor:
        """ViT -> Q-Former -> language projection: (B, 3, H, W) -> (B, num_query_tokens, d_lm); up to
        "vision", the ViT's last hidden state alone: (B, 1 + patches, d_vision)."""
        if upto == "vision":
            return _base(model).vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        out = model.get_image_features(pixel_values=pixel_values, return_dict=True)
        return out if torch.is_tensor(out) else out.pooler_output

    def cached_inputs(
        self, features: torch.Tensor, model: Any = None, upto: str = "projection"
    ) -> dict[str, Any]:
        from transformers.models.blip_2.modeling_blip_2 import BaseModelOutputWithVisionQformerOutputs

        if upto == "vision":  # the trainable Q-Former and projection run on the cached ViT output
            features = _after_vision(_base(model), features)
        return {
            "pixel_values": None,
            "mm_encoder_outputs": {"image": BaseModelOutputWithVisionQformerOutputs(pooler_output=features)},
        }

    @torch.no_grad()
    def generate_tokens(
        self, model: Any, processor: Any, batch: dict[str, torch.Tensor], **kwargs: Any
    ) -> torch.Tensor:
        kwargs.setdefault("eos_token_id", self.eos_token_id)
        kwargs.setdefault("pad_token_id", processor.tokenizer.pad_token_id)
        out = model.generate(**batch, **kwargs)
        # Decoder-only generation returns the prompt too: (B, T_prompt + T_new).
        return out[:, batch["input_ids"].shape[1] :]


def _base(model: Any) -> Any:
    """The transformers model under peft's and Accelerate's wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _after_vision(base: Any, image_embeds: torch.Tensor) -> torch.Tensor:
    """Steps 2 and 3 of `Blip2ForConditionalGeneration.get_image_features` (Q-Former over the query tokens,
    cross-attending to the image, then the language projection), from step 1's output. With --train-qformer
    peft's `modules_to_save` wrapper stands in `base.qformer` and routes to the trainable copy."""
    mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    query = base.query_tokens.expand(image_embeds.shape[0], -1, -1)
    out = base.qformer(query_embeds=query, encoder_hidden_states=image_embeds, encoder_attention_mask=mask)[0]
    return base.language_projection(out.to(image_embeds.dtype))  # the Q-Former is kept in fp32


def _target_text(prompt: str, target: str) -> str:
    # After a prompt ("... Answer:") the answer is a new word; a bare caption starts right after BOS.
    target = target.strip()
    return " " + target if prompt else target


def _pad(rows: list[list[int]], labels: list[list[int]], pad_id: int, side: str) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        lab[i, span] = torch.tensor(lb)
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}
