"""Examples to batches: the collator (through the family, so each family encodes its own way) and the seeded
epoch order that a resumed run repeats exactly."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..families.base import IGNORE_INDEX
from .packing import pack


@dataclass
class Collator:
    """Examples -> model inputs with labels, via the family (so every family masks its own way)."""

    family: Any
    processor: Any
    max_length: int
    cached: bool = False  # images come from a feature cache: send their indices, not pixels
    train_history: bool = True  # a dialogue's earlier replies train too (not with --train-on-last-turn-only)
    pack: int | None = None  # pack the examples into rows of this many positions (0: the longest example's)
    multiple: int = 0  # unpacked rows padded to a multiple of this many positions (a compiled model's shapes)
    max_positions: int | None = None  # ... but never past the language model's position limit

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        prompts, targets = [e["prompt"] for e in examples], [e["target"] for e in examples]
        text = dict(
            max_length=self.max_length,
            padding_side="right",
            history=[e["history"] for e in examples],
            train_history=self.train_history,
            turn_images=[e["turn_images"] for e in examples],
        )
        if self.cached:
            sizes = [e["image_sizes"] for e in examples]
            sizes = None if any(s is None for s in sizes) else sizes
            batch = self.family.encode_text(self.processor, prompts, targets, image_sizes=sizes, **text)
            batch["image_index"] = torch.tensor([e["index"] for e in examples])
        else:
            images = [e["images"] for e in examples]
            batch = self.family.encode(self.processor, images, prompts, targets, **text)
        pad = self.processor.tokenizer.pad_token_id
        if self.pack is None:
            return pad_to_multiple(batch, self.multiple, pad, self.max_positions) if self.multiple else batch
        return pack(batch, self.pack, pad, self.family.packable or ())


def pad_to_multiple(
    batch: dict[str, Any], multiple: int, pad_id: int, limit: int | None = None
) -> dict[str, Any]:
    """Right-padded rows padded on to the next multiple of `multiple` positions (or to `limit`, the model's
    position limit, if that comes first): every per-position input (a tensor of `input_ids`' shape) grows, ids
    with the pad token, labels with IGNORE_INDEX, masks and the rest with 0. Masked, unlabelled positions after
    every row's end change no loss (tested for every family); a compiled model then sees a few shapes instead of
    one per batch length."""
    ids = batch["input_ids"]
    length = ids.shape[1]
    extra = -length % multiple
    if limit is not None:
        extra = max(0, min(extra, limit - length))
    if not extra:
        return batch
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}
    return {
        key: torch.nn.functional.pad(value, (0, extra), value=fill.get(key, 0))
        if torch.is_tensor(value) and value.shape == ids.shape
        else value
        for key, value in batch.items()
    }


class EpochSampler(torch.utils.data.Sampler):
    """Example indices for one epoch, drawn from (seed, epoch) alone, so a resumed run sees the same batches;
    `position` also skips what an interrupted epoch already consumed.

    groups: example indices per image; given, each epoch takes one example of each image, drawn at random
        (one caption per image per epoch instead of every pair).
    lengths: given, the shuffled order is cut into spans of 50 batches and each span sorted longest first,
        so a batch holds examples of similar length (less padding) while the epoch stays random; the longest
        batches come early, so running out of memory happens at once if at all.
    """

    SPAN = 50  # batches per sorted span

    def __init__(
        self,
        n: int,
        seed: int,
        *,
        groups: list[list[int]] | None = None,
        lengths: list[int] | None = None,
        batch_size: int = 1,
    ):
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0
        self.groups, self.lengths, self.batch_size = groups, lengths, batch_size

    def position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.groups is None:
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            draw = torch.rand(len(self.groups), generator=g).tolist()
            picks = [grp[int(r * len(grp))] for grp, r in zip(self.groups, draw, strict=True)]
            order = [picks[i] for i in torch.randperm(len(picks), generator=g).tolist()]
        if self.lengths is not None:
            span, lengths = self.SPAN * self.batch_size, self.lengths
            order = [
                i
                for k in range(0, len(order), span)
                for i in sorted(order[k : k + span], key=lambda i: -lengths[i])
            ]
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return (self.n if self.groups is None else len(self.groups)) - self.start
