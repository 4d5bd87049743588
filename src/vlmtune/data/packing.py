"""Padding-free packing (`--packing`): a batch's examples laid end to end in a few rows, none seeing another.

A right-padded batch of B examples spends B x T positions (T its longest example) on the sum of their
lengths; captions of mixed length waste much of it on padding. Packed, the examples go first-fit-decreasing
into rows of `capacity` positions:

    row 0:  [image | prompt | caption | end] [image | caption | end] [image | caption | end] pad
    row 1:  [image | prompt | a longer caption ............. | end] [image | caption | end] pad pad

Each example gets its own positions (0, 1, ... from its start) and a block-diagonal causal attention mask
(R, 1, L, L), additive (0 where a position may look, the dtype's lowest elsewhere), so its tokens attend to
its own earlier tokens alone: a language model's SDPA or eager attention does not separate packed examples by
itself. The model fills image placeholders in reading order, so the per-example inputs (pixels, cached-feature
indices) follow the examples' new order. The loss is the mean over the same target tokens (each example
starts with untrained image positions, so no label crosses from one example into the next): the same loss
and gradients as the padded batch, for less work (a test checks both).
"""

from __future__ import annotations

from typing import Any

import torch

from ..families.base import IGNORE_INDEX

TOKEN_KEYS = ("input_ids", "attention_mask", "labels")  # (B, T) per token; everything else is per example


def rows_for(lengths: list[int], capacity: int) -> list[list[int]]:
    """Example indices per row: first-fit decreasing into rows of `capacity` positions (ties by index, so
    the packing is a function of the lengths alone)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for k in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        row = next((r for r, left in enumerate(room) if left >= lengths[k]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(k)
        room[row] -= lengths[k]
    return rows


def pack(batch: dict[str, Any], capacity: int, pad_id: int, example_keys: tuple[str, ...]) -> dict[str, Any]:
    """`batch` (right-padded, `TOKEN_KEYS` (B, T) and `example_keys` (B, ...)) packed into rows of at most
    `capacity` positions (at least its longest example; 0: that, so no row costs more than a padded one):
    input_ids, labels and position_ids (R, L), a 4D attention mask (R, 1, L, L), the per-example inputs in
    the packed order, and `packed_examples` (B)."""
    unknown = set(batch) - set(TOKEN_KEYS) - set(example_keys)
    if unknown:
        raise ValueError(f"cannot pack inputs {sorted(unknown)}: neither per token nor per example")
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    rows = rows_for(lengths, max(capacity, max(lengths)))
    width = max(sum(lengths[k] for k in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    # which example each position holds (-1: padding), for the block-diagonal mask
    owner = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for k in row:
            n = lengths[k]
            ids[r, at : at + n] = batch["input_ids"][k, :n]
            if "labels" in batch:
                labels[r, at : at + n] = batch["labels"][k, :n]
            positions[r, at : at + n] = torch.arange(n)
            owner[r, at : at + n] = k
            at += n
    same = owner[:, :, None] == owner[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    # a padding position looks at itself alone (a row with nothing to look at would give NaN)
    allowed = (same & (owner[:, :, None] >= 0) & causal) | torch.eye(width, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(
        ~allowed, torch.finfo(torch.float32).min
    )
    order = torch.tensor([k for row in rows for k in row])
    out = {"input_ids": ids, "attention_mask": mask[:, None], "position_ids": positions}
    if "labels" in batch:
        out["labels"] = labels
    out.update({key: batch[key][order] for key in example_keys if key in batch})
    out["packed_examples"] = len(lengths)
    return out
