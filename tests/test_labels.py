"""How BLIP-2 inputs and labels are built: image placeholders in input_ids, only the target tokens trained,
and every caption ending with the model's end-of-sequence token ("\\n" for BLIP-2 OPT)."""

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from vlmtune.families import IGNORE_INDEX, family_for


@pytest.fixture(scope="module")
def tiny(tiny_path):
    config = AutoConfig.from_pretrained(tiny_path)
    return AutoProcessor.from_pretrained(tiny_path), family_for(config), config


def images(n):
    return [Image.new("RGB", (80, 60), (40 * i, 100, 200)) for i in range(n)]


def test_caption_labels(tiny):
    processor, family, config = tiny
    captions = ["a red ball", "two players in blue and white jerseys near the goal"]
    batch = family.encode(processor, images(2), ["", ""], captions, max_length=48, padding_side="right")
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    n_q = config.num_query_tokens
    tok = processor.tokenizer
    bos, eos, pad = config.text_config.bos_token_id, config.text_config.eos_token_id, tok.pad_token_id
    assert eos == tok.convert_tokens_to_ids("Ċ")  # "\n", as 50118 is for OPT
    for i, caption in enumerate(captions):
        # placeholders first, exactly as many as the Q-Former has queries, then BOS
        assert (ids[i, :n_q] == config.image_token_id).all()
        assert (ids[i] == config.image_token_id).sum() == n_q
        assert ids[i, n_q] == bos
        # labels: the caption tokens and EOS, nothing else
        target = tok(caption, add_special_tokens=False)["input_ids"] + [eos]
        trained = labels[i][labels[i] != IGNORE_INDEX].tolist()
        assert trained == target
        assert tok.decode(trained) == caption + "\n"
        length = int(mask[i].sum())
        assert (labels[i, : n_q + 1] == IGNORE_INDEX).all()  # image and BOS positions
        assert (labels[i, length:] == IGNORE_INDEX).all()  # padding
        assert (ids[i, length:] == pad).all() and (mask[i, :length] == 1).all()
        assert labels[i, length - 1] == eos
    # The shorter caption is padded, and none of the padding is trained.
    assert mask[0].sum() < mask[1].sum()


def test_prompt_positions_are_masked(tiny):
    processor, family, config = tiny
    prompt = family.format_question("what colour is the ball?")
    batch = family.encode(processor, images(1), [prompt], ["white"], max_length=48, padding_side="right")
    labels = batch["labels"][0]
    prompt_len = config.num_query_tokens + len(processor.tokenizer(prompt)["input_ids"])  # with BOS
    assert (labels[:prompt_len] == IGNORE_INDEX).all()
    trained = labels[labels != IGNORE_INDEX].tolist()
    assert processor.tokenizer.decode(trained) == " white\n"


def test_truncated_caption_gets_no_eos(tiny):
    processor, family, config = tiny
    long = "a player " * 40
    batch = family.encode(processor, images(1), [""], [long], max_length=12, padding_side="right")
    trained = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    assert len(trained) == 12 - 1  # max_length text tokens, BOS included
    assert config.text_config.eos_token_id not in trained.tolist()


def test_generation_inputs_are_left_padded(tiny):
    processor, family, config = tiny
    prompts = ["", family.format_question("how many players are there?")]
    batch = family.encode(processor, images(2), prompts, None, max_length=48, padding_side="left")
    assert "labels" not in batch
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask[:, -1] == 1).all()  # generation continues right after the prompt
    short = int(mask[0].sum())
    assert (mask[0, : ids.shape[1] - short] == 0).all()
    assert (ids[0, -short:][: config.num_query_tokens] == config.image_token_id).all()


def test_mismatched_processor_is_caught(tiny):
    processor, family, config = tiny
    original = processor.num_query_tokens
    processor.num_query_tokens = original + 1
    try:
        with pytest.raises(ValueError, match="query tokens"):
            family.encode(processor, images(1), [""], ["x"], max_length=8, padding_side="right")
    finally:
        processor.num_query_tokens = original


def test_unsupported_family_is_named():
    config = AutoConfig.for_model("gpt2")
    with pytest.raises(ValueError, match="gpt2"):
        family_for(config)


def test_model_loss_is_over_target_tokens_only(tiny, tiny_path):
    from transformers import AutoModelForImageTextToText

    processor, family, _ = tiny
    model = AutoModelForImageTextToText.from_pretrained(tiny_path)
    batch = family.encode(
        processor,
        images(2),
        ["", ""],
        ["a red ball", "two players near the goal"],
        max_length=48,
        padding_side="right",
    )
    out = model(**batch)
    # Next-token cross-entropy over exactly the positions our labels keep: logits at t predict labels at t+1.
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep])
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize(
    "prompts", [["", ""], ["Question: what is red? Answer:", "Question: where? Answer:"]]
)
def test_logits_only_over_targets_give_the_same_loss_and_gradients(tiny, tiny_path, prompts):
    """`loss_inputs` skips the logits of the image and prompt positions; loss and gradients stay the same."""
    from transformers import AutoModelForImageTextToText

    processor, family, config = tiny
    model = AutoModelForImageTextToText.from_pretrained(tiny_path)
    batch = family.encode(
        processor, images(2), prompts, ["a red ball", "near the goal"], max_length=48, padding_side="right"
    )
    trimmed = family.loss_inputs(batch)
    # No logits for the image placeholders, nor for a prompt: the first kept position predicts the first target.
    assert trimmed["logits_to_keep"] <= batch["labels"].shape[1] - config.num_query_tokens - (
        3 if prompts[0] else 0
    )
    results = []
    for inputs in (batch, trimmed):
        model.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        results.append(
            (out.loss.detach(), out.logits.shape[1], model.language_projection.weight.grad.clone())
        )
    (full, full_len, full_grad), (cut, cut_len, cut_grad) = results
    torch.testing.assert_close(cut, full)
    torch.testing.assert_close(cut_grad, full_grad)
    assert cut_len == trimmed["logits_to_keep"] < full_len
