"""Evaluation during training: the validation loss (from pixels or cached features) and the caption metrics of
the validation split, both computed in shares by every process and agreed on by all of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..families import IGNORE_INDEX, Family, to_model
from .cache import with_features
from .loss import training_loss


@torch.no_grad()
def evaluate_loss(
    model: Any,
    family: Family,
    loader: DataLoader,
    dtype: torch.dtype,
    accelerator: Any,
    features: Any = None,
    upto: str | None = None,
    loss_chunk: int | None = None,
) -> float:
    """Mean loss over `loader` (this process's share), weighted by each batch's number of target tokens and
    summed over every process; with `features`, the loader's batches carry image indices into them. Leaves
    `model` in eval mode."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (loss x tokens, tokens)
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        if features is not None:
            with_features(batch, features, upto, family, model, accelerator.device)
        else:
            batch = to_model(batch, accelerator.device, dtype)
        n = (batch["labels"] != IGNORE_INDEX).sum()  # each target token is scored once, in every family
        loss = training_loss(model, family, batch, loss_chunk)
        total += torch.stack([loss.double() * n, n.double()])
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, "sum")
    return float(total[0] / total[1].clamp(min=1))


@torch.no_grad()
def caption_metrics(
    accelerator: Any,
    model: Any,
    generate: Callable[[Any, list[dict[str, Any]]], list[str]],
    examples: Any,
    size: int,
) -> dict[str, float]:
    """Caption metrics of the validation examples: each process captions every n-th one (`generate(model,
    examples)`, `size` at a time), the main process scores them all, and every process gets the scores (they
    must agree on which adapter is best). Leaves `model` in eval mode."""
    from accelerate.utils import broadcast_object_list, gather_object

    from ..metrics import caption_scores

    model.eval()
    mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
    got: list[tuple[int, str]] = []
    for start in range(0, len(mine), size):
        chunk = mine[start : start + size]
        got += zip(chunk, generate(model, [examples[i] for i in chunk]), strict=True)
    if accelerator.num_processes > 1:
        got = gather_object(got)
    scores = [None]
    if accelerator.is_main_process:
        captions = dict(got)
        refs = {str(i): [examples[i]["target"]] for i in range(len(examples))}
        scores = [caption_scores({str(i): captions[i] for i in range(len(examples))}, refs)["scores"]]
    if accelerator.num_processes > 1:
        broadcast_object_list(scores)
    return scores[0]
