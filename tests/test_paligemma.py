"""PaliGemma beyond the family contract: the prefix-LM layout is the processor's own, and the model reads it as
a prefix-LM (the image and task prompt attend both ways, the caption only causally)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from tiny_families import build_paligemma
from vlmtune.families import family_for


@pytest.fixture(scope="module")
def paligemma(tmp_path_factory):
    path = build_paligemma(tmp_path_factory.mktemp("paligemma") / "paligemma-2")
    return path, family_for(AutoConfig.from_pretrained(path)), AutoProcessor.from_pretrained(path)


def test_the_layout_is_the_processors_own_suffix_layout(paligemma):
    _, family, processor = paligemma
    image = Image.new("RGB", (40, 24), (200, 30, 30))
    for prompt, caption in (("caption en", "a red ball on the left"), ("answer en what colour?", "red")):
        ours = family.encode(processor, [image], [prompt], [caption], max_length=64, padding_side="right")
        ref = processor(images=[image], text=["<image>" + prompt], suffix=[caption], return_tensors="pt")
        for name in ("input_ids", "labels", "token_type_ids", "pixel_values"):
            assert torch.equal(ours[name], ref[name]), name
        # the caption and <eos> train, and they are what token_type_ids marks as the causal suffix
        assert torch.equal(ours["token_type_ids"].bool(), ours["labels"] != -100)


def test_the_prefix_attends_both_ways_and_the_caption_causally(paligemma):
    path, family, processor = paligemma
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    image = Image.new("RGB", (32, 32), (30, 40, 220))

    def run(prompt: str, caption: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        batch = family.encode(processor, [image], [prompt], [caption], max_length=64, padding_side="right")
        with torch.no_grad():
            out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        return batch, out

    batch, base = run("caption en", "a red ball")
    # a different last word of the prompt changes what the first image position sees: bidirectional
    assert not torch.allclose(base[0], run("caption es", "a red ball")[1][0])
    # a different caption word leaves every position before it as it was, and changes what follows: causal
    other_batch, other = run("caption en", "a red goal")
    ids, other_ids = batch["input_ids"][0].tolist(), other_batch["input_ids"][0].tolist()
    first = next(i for i, (a, b) in enumerate(zip(ids, other_ids, strict=False)) if a != b)
    assert batch["token_type_ids"][0, first - 1] == 1  # the words differ inside the caption, after "a red"
    assert torch.allclose(base[:first], other[:first], atol=1e-5)
    assert not torch.allclose(base[first], other[first])
