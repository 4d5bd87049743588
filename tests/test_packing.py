"""--packing: a batch's examples end to end in a few rows, each attending to itself alone; the same loss and
gradients as the padded batch, and the same adapter from a short run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmtune.config import TrainConfig
from vlmtune.data.batching import Collator
from vlmtune.data.examples import Dialogue
from vlmtune.data.packing import pack, rows_for
from vlmtune.data.synthetic import examples
from vlmtune.errors import ConfigError
from vlmtune.families import IGNORE_INDEX, family_for
from vlmtune.rundir import read_jsonl
from vlmtune.training.cache import with_features
from vlmtune.training.run import train


@pytest.fixture(scope="module")
def tiny(tiny_path):
    model = AutoModelForImageTextToText.from_pretrained(tiny_path).eval()  # eval: no dropout
    return model, AutoProcessor.from_pretrained(tiny_path), family_for(model.config)


def mixed(n: int = 6) -> list[dict]:
    """Examples of mixed caption length (one with a question and a dialogue's history)."""
    rows = list(examples("football", n, seed=5))
    longer = {0: 30, 3: 8}  # one long caption (that long, two others share a row), one a little longer
    out = [
        Dialogue("", r.text + " and more" * longer.get(k, 0)).example([r.image], k)
        for k, r in enumerate(rows)
    ]
    history = (("", rows[1].text),)  # a caption, then a question about the image
    out[1] = Dialogue("Question: how many players? Answer:", "two", history, (1, 0)).example(
        [rows[1].image], 1
    )
    return out


def test_first_fit_decreasing_fills_rows_and_keeps_every_example():
    rows = rows_for([50, 20, 30, 60, 10, 40], 60)
    assert sorted(k for row in rows for k in row) == list(range(6))
    assert rows == [[3], [0, 4], [5, 1], [2]]  # 60; 50 + 10; 40 + 20; 30


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_batch_gives_the_loss_and_gradients_of_the_padded_one(tiny):
    model, processor, family = tiny
    for p in model.parameters():  # gradients for every weight the language model and projection use
        p.requires_grad_(True)
    items = mixed()
    padded = Collator(family, processor, 96)(items)
    packed = Collator(family, processor, 96, pack=0)(items)
    assert packed.pop("packed_examples") == len(items)
    assert packed["input_ids"].shape[0] < len(items)  # fewer rows
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # and fewer positions
    assert (packed["labels"] != IGNORE_INDEX).sum() == (padded["labels"] != IGNORE_INDEX).sum()
    loss, grads = loss_and_grads(model, padded)
    packed_loss, packed_grads = loss_and_grads(model, packed)
    torch.testing.assert_close(packed_loss, loss)
    assert grads.keys() == packed_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(packed_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_no_packed_example_sees_another(tiny):
    model, processor, family = tiny
    items = mixed(3)
    batch = Collator(family, processor, 96, pack=1000)(items)  # all three in one row
    batch.pop("packed_examples")
    assert batch["input_ids"].shape[0] == 1
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    first, second = starts[0], starts[1]
    changed = dict(batch, input_ids=batch["input_ids"].clone(), pixel_values=batch["pixel_values"].clone())
    changed["input_ids"][0, second:] = processor.tokenizer("zzz")["input_ids"][-1]  # every later token
    changed["pixel_values"][1:] = 0  # and the later examples' images
    with torch.no_grad():
        before = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        after = model(**{k: v for k, v in changed.items() if k != "labels"}).logits
    torch.testing.assert_close(after[0, first:second], before[0, first:second])  # the first example's
    assert not torch.allclose(after[0, second:], before[0, second:])


def test_packed_cached_features_follow_their_examples(tiny):
    """With cached image features, each example's feature index moves with it into its row."""
    model, processor, family = tiny
    items = mixed()
    full = Collator(family, processor, 96)(items)
    with torch.no_grad():
        features = family.image_features(model, full)  # (6, queries, width), in example order
    text_only = [{**x, "images": [], "image_sizes": None} for x in items]
    packed = Collator(family, processor, 96, cached=True, pack=0)(text_only)
    packed.pop("packed_examples")
    with torch.no_grad():
        fresh = model(**full).loss
        cached = model(
            **with_features(packed, features, "projection", family, model, torch.device("cpu"))
        ).loss
    torch.testing.assert_close(cached, fresh)


def short(data, out, **extra) -> TrainConfig:
    return TrainConfig(model="tiny", data=data, output=str(out), max_steps=4, batch_size=8, lr=1e-2, log_every=1,
                       lora_dropout=0.0, lm_dropout=0.0, sample_every=0, num_samples=0, **extra)  # fmt: skip


def test_a_packed_run_trains_the_same_adapter(football, tmp_path):
    """The same run up to float rounding: the packed rows sum in another order, and Adam divides each
    gradient by its own running size, so a weight whose gradient is all rounding may move a little
    differently. The first step's loss (the same weights, the same batch) is the padded run's; the later ones
    stay within 0.1%, and after four steps 99% of the weights are within 2% of one step (lr) of the padded
    run's. (The gradients of one batch, packed or not, agree to 1e-4: the test above.)"""
    runs = {name: train(short(football, tmp_path / name, **extra)) for name, extra in
            (("plain", {}), ("packed", {"packing": True}))}  # fmt: skip
    losses = {
        name: [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
        for name, run in runs.items()
    }
    assert len(losses["plain"]) == 4
    torch.testing.assert_close(losses["packed"][0], losses["plain"][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(losses["packed"], losses["plain"], rtol=1e-3, atol=0)
    plain, packed = (load_file(str(runs[n] / "adapter_model.safetensors")) for n in ("plain", "packed"))
    assert plain.keys() == packed.keys()
    apart = torch.cat([(packed[k] - plain[k]).abs().flatten() for k in plain]) / 1e-2  # in steps
    assert (apart <= 0.02).float().mean() >= 0.99, (apart > 0.02).sum()


def test_packing_is_refused_where_the_family_cannot_pack(tmp_path):
    from tiny_families import BUILDERS

    model = BUILDERS["blip-2-t5"](tmp_path / "t5")  # an encoder-decoder: its decoder holds one target
    with pytest.raises(ConfigError, match="--packing: blip-2-t5 cannot pack examples into rows"):
        train(TrainConfig(model=str(model), data=str(tmp_path), packing=True, pack_length=-1))
    with pytest.raises(ConfigError, match="--pack-length must be 0"):
        train(TrainConfig(model="tiny", data=str(tmp_path), packing=True, pack_length=-1))


def test_pack_refuses_an_input_it_cannot_place():
    batch = {
        "input_ids": torch.ones(2, 3, dtype=torch.long),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
        "token_type_ids": torch.zeros(2, 3, dtype=torch.long),
    }
    with pytest.raises(ValueError, match=r"cannot pack inputs \['token_type_ids'\]"):
        pack(batch, 0, 0, ("pixel_values",))
