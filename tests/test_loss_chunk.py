"""--loss-chunk: the loss over the target positions only, a chunk at a time. The same loss and gradients as the
model's own for every family (tests/test_families.py); here the loss function against transformers' own in
bf16 and with each of its arguments, a run that trains the same adapter, and the refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers.loss.loss_utils import ForCausalLMLoss

from vlmtune.config import TrainConfig
from vlmtune.errors import ConfigError
from vlmtune.rundir import read_jsonl
from vlmtune.training.loss import _ChunkedLoss
from vlmtune.training.run import train


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "bias+softcap", "shift_labels", "num_items"])
def test_the_chunked_loss_is_transformers_own(dtype, case):
    """Against `ForCausalLMLoss` on full logits (the head, the cap and the upcast applied first): the same
    loss and the same gradients to the hidden states and the head, in bf16 too (each chunk is cast as the full
    logits are)."""
    torch.manual_seed(0)
    rows, positions, width, vocab = 3, 11, 16, 50
    hidden = torch.randn(rows, positions, width, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, width, dtype=dtype, requires_grad=True)
    bias = torch.randn(vocab, dtype=dtype) if case == "bias+softcap" else None
    softcap = 2.0 if case == "bias+softcap" else None
    labels = torch.randint(0, vocab, (rows, positions))
    labels[:, :4] = -100  # a prompt
    labels[1, 9:] = -100  # padding
    kwargs = {}
    if case == "shift_labels":  # an encoder-decoder's labels: not shifted
        kwargs["shift_labels"] = labels
    if case == "num_items":
        kwargs["num_items_in_batch"] = torch.tensor(40)

    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    own = ForCausalLMLoss(logits, labels, vocab, **kwargs)
    own_grads = torch.autograd.grad(own, (hidden, weight))
    for chunk in (1, 4, 100):
        loss = _ChunkedLoss(weight, bias, chunk, softcap)(hidden, labels, vocab, **kwargs)
        grads = torch.autograd.grad(loss, (hidden, weight))
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
        torch.testing.assert_close(loss, own, **tol)
        for g, o in zip(grads, own_grads, strict=True):
            torch.testing.assert_close(g, o, **tol)


def test_chunks_hold_only_their_own_logits():
    """The point of chunking: the backward keeps the hidden states of the targets, not their logits. The
    tensors saved for the backward add up to the targets' hidden states, far less than one chunk's logits."""
    torch.manual_seed(0)
    hidden = torch.randn(4, 64, 8, requires_grad=True)
    weight = torch.randn(1000, 8)
    labels = torch.randint(0, 1000, (4, 64))
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _ChunkedLoss(weight, None, 32, None)(hidden, labels, 1000)
    loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert max(saved) < 32 * 1000  # no chunk's logits (32 x 1000) are kept for the backward


def short(data, out, **extra) -> TrainConfig:
    return TrainConfig(model="tiny", data=data, output=str(out), max_steps=4, batch_size=8, lr=1e-2, log_every=1,
                       lora_dropout=0.0, lm_dropout=0.0, sample_every=0, num_samples=0, val_fraction=0.25, eval_every=2,
                       **extra)  # fmt: skip


def test_a_chunked_run_trains_the_same_adapter(football, tmp_path):
    """Four steps and a validation with the loss in chunks of 5 targets: the same losses (training and
    validation) and the same adapter as the model's own loss, up to float rounding."""
    runs = {name: train(short(football, tmp_path / name, loss_chunk=chunk)) for name, chunk in
            (("own", 0), ("chunked", 5))}  # fmt: skip
    logs = {name: list(read_jsonl(run / "metrics.jsonl")) for name, run in runs.items()}
    for key in ("loss", "val_loss"):
        own, chunked = ([r[key] for r in logs[n] if key in r] for n in ("own", "chunked"))
        assert own, key
        torch.testing.assert_close(chunked, own, rtol=1e-5, atol=0)
    own, chunked = (load_file(str(runs[n] / "adapter_model.safetensors")) for n in ("own", "chunked"))
    assert own.keys() == chunked.keys()
    for k in own:
        torch.testing.assert_close(chunked[k], own[k], rtol=1e-3, atol=1e-5)


def test_loss_chunk_is_refused_where_the_model_scores_its_loss_itself(football, tmp_path):
    from tiny_families import BUILDERS

    model = BUILDERS["blip"](tmp_path / "blip")
    with pytest.raises(ConfigError, match="--loss-chunk: blip cannot chunk its loss .*label smoothing"):
        train(TrainConfig(model=str(model), data=str(tmp_path), loss_chunk=8))
    with pytest.raises(ConfigError, match="--loss-chunk must be 0"):
        train(TrainConfig(model="tiny", data=str(tmp_path), loss_chunk=-1))
    # known only once LoRA is on: an output layer it wraps
    with pytest.raises(ConfigError, match="--loss-chunk: the output layer is a .*lora"):
        train(short(football, tmp_path / "head", loss_chunk=8, lora_targets=r".*(q_proj|lm_head)"))


def test_chunks_under_gradient_checkpointing_train_the_same(football, tmp_path, capsys):
    """Chunks checkpoint their logits inside a language model that checkpoints its layers: the same losses.
    The log says how the loss is scored."""
    losses = {}
    for name, chunk in (("own", 0), ("chunked", None)):
        run = train(short(football, tmp_path / name, loss_chunk=chunk, gradient_checkpointing=True))
        losses[name] = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    torch.testing.assert_close(losses["chunked"], losses["own"], rtol=1e-5, atol=0)
    out = capsys.readouterr().out
    assert "loss: the model's own, over every kept position (--loss-chunk 0)" in out
    assert "loss: over the target positions only, 1024 at a time (--loss-chunk)" in out
