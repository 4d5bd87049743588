"""The training loss, optionally chunked (`--loss-chunk N`).

A model's own loss turns every kept position into logits over the whole vocabulary, upcasts them to fp32 and
only then ignores the positions without a label: with a 150k-token vocabulary, 8 rows of 2,048 positions are
9 GiB of fp32 logits before the backward adds their gradient. Chunked, the output layer runs on the target
positions alone, N at a time, each chunk under activation checkpointing: its logits exist only while its loss
(and, in the backward, its gradient) is computed. The loss and the gradients are the model's own: the same
head, softcap and fp32 upcast per chunk, the same mean over the targets (a test checks it for every family).

How, without a forward of our own per family: for the training forward, the output layer passes its input
through unchanged, so the model hands its last hidden states to its `loss_function` in place of the logits,
and that loss function is replaced by one that applies the output layer itself, chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..families import IGNORE_INDEX, Family

#: target positions per chunk unless --loss-chunk says: a chunk's fp32 logits and their gradient are 0.4 GiB
#: over OPT's 50k-token vocabulary, 1.2 GiB over Qwen's 152k
DEFAULT_CHUNK = 1024


def training_loss(
    model: Any, family: Family, batch: dict[str, Any], chunk: int | None = None
) -> torch.Tensor:
    """The loss of the model's forward on `batch`: over the target positions only, `chunk` at a time (None:
    `DEFAULT_CHUNK` where the model allows it, else its own loss), or the model's own loss (0)."""
    with chunked_cross_entropy(model, family, chunk) as chunking:
        # In chunks the targets alone are scored already: the family's trim of the logits (a
        # `logits_to_keep` that varies from batch to batch, and would recompile a compiled model) is moot.
        return model(**(batch if chunking else family.loss_inputs(batch))).loss


@contextmanager
def chunked_cross_entropy(model: Any, family: Family, chunk: int | None) -> Iterator[bool]:
    """Within: `model`'s forward scores its loss chunk by chunk (yields True), or as its own (False). A chunk
    size the model cannot take raises ValueError; None chunks where it can."""
    hf = transformers_model(model)
    head, why = output_layer(hf, family)
    if why and chunk:
        raise ValueError(f"--loss-chunk: {why}; train without it")
    if why or chunk == 0:
        yield False
        return
    chunk = chunk or DEFAULT_CHUNK
    softcap, text_config = family.logit_softcap(hf.config), hf.config.get_text_config()
    loss = _ChunkedLoss(head.weight, head.bias, chunk, softcap)
    had_own = "_loss_function" in vars(hf)
    previous = vars(hf).get("_loss_function")
    head.forward = _unchanged  # an instance attribute: the class's forward comes back when it is deleted
    hf.loss_function = loss
    if softcap is not None:  # the model would cap the hidden states it passes on: the loss caps the logits
        text_config.final_logit_softcapping = None
    try:
        yield True
    finally:
        if softcap is not None:
            text_config.final_logit_softcapping = softcap
        del head.forward
        if had_own:
            hf.loss_function = previous
        else:
            del hf._loss_function


def describe(model: Any, family: Family, chunk: int | None) -> str:
    """How the training loss will be scored, for the log."""
    why = output_layer(transformers_model(model), family)[1]
    if chunk == 0 or why:
        return f"loss: the model's own, over every kept position ({why or '--loss-chunk 0'})"
    return f"loss: over the target positions only, {chunk or DEFAULT_CHUNK} at a time (--loss-chunk)"


def transformers_model(model: Any) -> Any:
    """The transformers model inside DDP's and peft's wrappers: the one whose forward scores the loss."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_layer(hf: Any, family: Family) -> tuple[torch.nn.Linear | None, str | None]:
    """The model's output layer if the chunked loss can apply it itself, else (None, why not): the model
    scores its loss itself, or the head is not a plain linear layer (a LoRA-wrapped or quantised head would
    lose its adapter or its dequantisation)."""
    why = unchunkable(family)
    if why:
        return None, why
    head = hf.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return None, (
            f"the output layer is a {type(head).__name__}, not a plain linear layer (a --lora-targets match, "
            "or quantised?)"
        )
    return head, None


def unchunkable(family: Family) -> str | None:
    """Why `family`'s model cannot have its loss chunked, known from its config alone (None: it can)."""
    why = family.own_loss()
    return f"{family.name} cannot chunk its loss ({why})" if why else None


def _unchanged(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


class _ChunkedLoss:
    """transformers' `ForCausalLMLoss` (the shift, `shift_labels`, `num_items_in_batch`, the mean over the
    targets), taking the last hidden states instead of the logits and applying the output layer itself."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, chunk: int, softcap: float | None):
        self.weight, self.bias, self.chunk, self.softcap = weight, bias, chunk, softcap

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        vocab_size: int | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = IGNORE_INDEX,
        shift_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        hidden = logits  # the output layer passed its input through: these are the last hidden states
        if shift_labels is None:  # tokens < n predict n
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        targets = shift_labels.reshape(-1).to(hidden.device)
        keep = targets != ignore_index
        hidden, targets = hidden.reshape(-1, hidden.shape[-1])[keep], targets[keep]
        total = (hidden.sum() * 0).float()  # a graph even with no target, as the model's own loss has
        for start in range(0, targets.numel(), self.chunk):
            end = start + self.chunk
            total = total + checkpoint(
                self._chunk_sum, hidden[start:end], targets[start:end], use_reentrant=False
            )
        count = keep.sum() if num_items_in_batch is None else num_items_in_batch
        if torch.is_tensor(count):
            count = count.to(total.device)
        return total / count

    def _chunk_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight, self.bias)
        if self.softcap is not None:  # as the model applies it, before the upcast
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return F.cross_entropy(logits.float(), targets, reduction="sum")
