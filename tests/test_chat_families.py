"""The chat-template families beyond the family contract (Qwen-VL, Gemma 3, LLaVA, InternVL): labels from the
real chat template, image tokens that vary with the image and are checked against it, --min/max-pixels honoured
and reported."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from tiny_families import build_qwen_vl
from vlmtune.config import DataCheckConfig, TrainConfig
from vlmtune.data.checks import check
from vlmtune.errors import ConfigError
from vlmtune.families import IGNORE_INDEX, family_for
from vlmtune.training.run import train


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = build_qwen_vl(tmp_path_factory.mktemp("qwen") / "qwen2-vl")
    return str(path), family_for(AutoConfig.from_pretrained(path)), AutoProcessor.from_pretrained(path)


CHAT_KINDS = ["qwen2-vl", "qwen3-vl", "gemma-3", "llava-1.5", "llava-next", "internvl", "smolvlm", "idefics3"]


@pytest.fixture(scope="module", params=CHAT_KINDS)
def chat_family(request, tmp_path_factory):
    from tiny_families import BUILDERS, MEMBERS

    path = (BUILDERS | MEMBERS)[request.param](tmp_path_factory.mktemp("chat") / request.param)
    return family_for(AutoConfig.from_pretrained(path)), AutoProcessor.from_pretrained(path)


def test_a_dialogue_is_laid_out_by_the_real_template_and_only_replies_train(chat_family):
    family, processor = chat_family
    tok = processor.tokenizer
    image = Image.new("RGB", (32, 48), (200, 30, 30))
    history = [("What is in the picture?", "a red ball"), ("Where is it?", "on the left")]
    batch = family.encode(
        processor,
        [image],
        ["What colour is it?"],
        ["red"],
        max_length=200,
        padding_side="right",
        history=[history],
    )
    turns = [*history, ("What colour is it?", "red")]
    rendered = processor.apply_chat_template(family.messages(turns), tokenize=False)
    # the processor's own ids for the whole rendered dialogue (its image tokens expanded by the processor),
    # less the one token the template writes after the last end of turn (a newline, a space)
    bos = processor.tokenizer.bos_token  # added by the tokenizer only where the template wrote none
    special = not (bos and rendered.startswith(bos))
    ref = processor(images=[image], text=[rendered], return_tensors="pt", add_special_tokens=special)
    assert batch["input_ids"][0].tolist() == ref["input_ids"][0].tolist()[:-1]
    for name in family.token_inputs(batch["input_ids"]):  # the per-token inputs: the processor's too
        assert batch[name][0].tolist() == ref[name][0].tolist()[:-1]
    spans = trained_spans(batch["labels"][0], tok)
    end = family.end_of_turn
    assert spans == [f"a red ball{end}", f"on the left{end}", f"red{end}"]
    # the turn headers, the questions and the image are never trained
    assert not any("What" in span or "user" in span for span in spans)


def trained_spans(labels: torch.Tensor, tok) -> list[str]:
    """The trained runs of positions, decoded (SmolVLM's template writes "Assistant: reply" but prompts
    generation with "Assistant:": the space is the reply's first character, and trains with it)."""
    spans, start = [], None
    for i, t in enumerate((labels != IGNORE_INDEX).tolist() + [False]):
        if t and start is None:
            start = i
        elif not t and start is not None:
            spans.append(tok.decode(labels[start:i]).removeprefix(" "))
            start = None
    return spans


def test_several_images_open_the_user_turns_that_hold_them(chat_family):
    """Two images with the first question and one with the third: each turn's placeholders where the template
    puts them, the ids the processor's own for the whole dialogue (each image expanded by its own size), only
    the replies trained, and --max-length counted as encode spends it."""
    family, processor = chat_family
    images = [
        Image.new("RGB", (32, 48), (200, 30, 30)),
        Image.new("RGB", (64, 32), (30, 30, 200)),
        Image.new("RGB", (48, 48), (30, 200, 30)),
    ]
    history, turns = [("Which is red?", "the first"), ("And the other?", "blue")], (2, 0, 1)
    prompt, target = "What colour is the new one?", "green"
    batch = family.encode(
        processor, [images], [prompt], [target], max_length=300, padding_side="right", history=[history],
        turn_images=[turns],
    )  # fmt: skip
    rendered = processor.apply_chat_template(
        family.messages([*history, (prompt, target)], turns), tokenize=False
    )
    at = [rendered.index(text) for text in ("Which is red?", "And the other?", prompt)]
    pieces = [rendered[: at[0]], rendered[at[0] : at[1]], rendered[at[1] : at[2]]]
    assert [piece.count(family.image_token) for piece in pieces] == [2, 0, 1]
    bos = processor.tokenizer.bos_token
    special = not (bos and rendered.startswith(bos))
    ref = processor(images=[images], text=[rendered], return_tensors="pt", add_special_tokens=special)
    assert batch["input_ids"][0].tolist() == ref["input_ids"][0].tolist()[:-1]
    assert int((batch["input_ids"] == family.image_token_id).sum()) == family.image_token_count(ref)
    for name in processor.image_processor.model_input_names:
        if name in ref:
            assert torch.equal(batch[name], ref[name]), name
    end = family.end_of_turn
    assert trained_spans(batch["labels"][0], processor.tokenizer) == [
        f"the first{end}",
        f"blue{end}",
        f"green{end}",
    ]
    need = family.text_tokens(processor, prompt, target, history, turns)
    for budget, whole in ((need, True), (need - 1, False)):
        got = family.encode(
            processor, [images], [prompt], [target], max_length=budget, padding_side="right", history=[history],
            turn_images=[turns],
        )  # fmt: skip
        labels = got["labels"][0][got["labels"][0] != IGNORE_INDEX].tolist()
        assert (labels[-1] == family.end_token_id) == whole, budget


def test_image_tokens_follow_the_image_size_and_are_checked_against_it(qwen):
    _, family, processor = qwen
    small, wide = Image.new("RGB", (32, 32)), Image.new("RGB", (64, 32))
    batch = family.encode(processor, [small, wide], ["", ""], ["a", "b"], max_length=64, padding_side="right")
    counts = (batch["input_ids"] == family.image_token_id).sum(dim=1).tolist()
    assert counts == [4, 8] == [family.image_tokens(processor, *im.size) for im in (small, wide)]
    # a processor that merges differently from the model's config: refused before any step, saying why
    other = AutoProcessor.from_pretrained(qwen[0])
    other.image_processor.merge_size = 1
    with pytest.raises(ValueError, match="the text holds 16 image tokens but the image gives 4"):
        family.encode(other, [small], [""], ["a"], max_length=64, padding_side="right")


def test_max_pixels_is_honoured_saved_and_reported(qwen, tmp_path, capsys):
    path, family, processor = qwen
    folder = tmp_path / "data"
    folder.mkdir()
    lines = []
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)] * 4):
        Image.new("RGB", (128, 128), colour).save(folder / f"{i}.png")
        lines.append(
            json.dumps({"file_name": f"{i}.png", "text": "a red ball" if i % 2 == 0 else "a blue ball"})
        )
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")

    full = check(DataCheckConfig(data=str(folder), model=path, max_length=64))
    limited = check(DataCheckConfig(data=str(folder), model=path, max_length=64, max_pixels=32 * 32))
    # 128 x 128 is over the tiny processor's own limit (64 x 64 pixels, 16 tokens of 16 x 16); 32 x 32 at 1024
    assert full["splits"]["train"]["image_tokens"] == "min 16, median 16, max 16"
    assert limited["splits"]["train"]["image_tokens"] == "min 4, median 4, max 4"
    assert "image tokens per image: min 4, median 4, max 4" in capsys.readouterr().out

    run = train(
        TrainConfig(
            model=path,
            data=str(folder),
            output=str(tmp_path / "run"),
            max_steps=1,
            batch_size=2,
            max_pixels=32 * 32,
            sample_every=0,
            num_samples=0,
        )
    )
    saved = AutoProcessor.from_pretrained(run)  # what caption, serve and evaluate load with the run
    assert saved.image_processor.size["longest_edge"] == 32 * 32
    assert family.image_tokens(saved, 128, 128) == 4

    with pytest.raises(ConfigError, match="--min-pixels 4096 is over --max-pixels 1024"):
        train(TrainConfig(model=path, data=str(folder), min_pixels=4096, max_pixels=1024))
    with pytest.raises(ConfigError, match=r"blip-2 resizes every image to one size; .* \(qwen-vl\)"):
        train(TrainConfig(model="tiny", data=str(folder), max_pixels=1024))


def test_images_keep_at_most_the_default_pixels_unless_told(qwen, tmp_path, monkeypatch, capsys):
    """Without --max-pixels, a dynamic-resolution family's images keep at most `default_max_pixels` in
    training and in what `data check` counts (a photo at Qwen's own limit gives up to 16384 tokens); the tiny
    processor allows 64 x 64 pixels, so the default is lowered here to 32 x 32 to show it."""
    from vlmtune.families.qwen_vl import QwenVL

    path, family, _ = qwen
    monkeypatch.setattr(QwenVL, "default_max_pixels", 32 * 32)
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (128, 128), (200, 30, 30)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "text": "a ball"}) + "\n" for i in range(2))
    )

    def tokens(**pixels) -> str:
        return check(DataCheckConfig(data=str(folder), model=path, max_length=64, **pixels))["splits"][
            "train"
        ]["image_tokens"]

    assert tokens() == "min 4, median 4, max 4"  # 32 x 32 pixels: 2 x 2 merged patches
    assert tokens(max_pixels=64 * 64) == "min 16, median 16, max 16"  # asked for: the processor's own limit
    assert tokens(min_pixels=48 * 48) == "min 9, median 9, max 9"  # the fewest asked for is over the default
    run = train(TrainConfig(model=path, data=str(folder), output=str(tmp_path / "run"), max_steps=1,
                            batch_size=2, sample_every=0, num_samples=0))  # fmt: skip
    assert (
        "images resized to at most 1024 pixels (--max-pixels; the checkpoint's processor allows 4096)"
        in capsys.readouterr().out
    )
    assert AutoProcessor.from_pretrained(run).image_processor.size["longest_edge"] == 32 * 32


def test_the_gpu_checks_real_size_builders_make_checkpoints_vlmtune_loads(tmp_path):
    """scripts/gpu_check.py --only qwen / gemma build Qwen2.5-VL-3B's and Gemma-3-4B's shapes; here at small shapes
    with the same code."""
    import importlib.util
    from pathlib import Path

    from vlmtune.modeling import load_base

    script = Path(__file__).parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", script)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    small = {
        "vision_config": dict(gpu_check.QWEN25_VL_3B["vision_config"], depth=2, hidden_size=32, out_hidden_size=32,
                              intermediate_size=64, num_heads=2, fullatt_block_indexes=[1]),
        "text_config": dict(gpu_check.QWEN25_VL_3B["text_config"], vocab_size=1000, hidden_size=32,
                            intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
    }  # fmt: skip
    gpu_check.build_random_qwen(tmp_path / "qwen", small)
    model, processor, family = load_base(str(tmp_path / "qwen"), "float32", "none", torch.device("cpu"))
    assert family.name == "qwen-vl" and type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    batch = family.encode(processor, [Image.new("RGB", (224, 224))], ["Describe."], ["a ball"], max_length=64,
                          padding_side="right")  # fmt: skip
    assert (
        batch["input_ids"] == family.image_token_id
    ).sum() == 64  # 224 / 14 = 16 patches a side, 2 x 2 merged
    assert model(**batch).loss.isfinite()

    gemma = {
        "vision_config": dict(gpu_check.GEMMA3_4B["vision_config"], hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, image_size=56),
        "text_config": dict(gpu_check.GEMMA3_4B["text_config"], vocab_size=1000, hidden_size=32,
                            intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=16, query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"]),
        "mm_tokens_per_image": 4,
    }  # fmt: skip
    gpu_check.build_random_gemma(tmp_path / "gemma", gemma)
    model, processor, family = load_base(str(tmp_path / "gemma"), "float32", "none", torch.device("cpu"))
    assert family.name == "gemma-3"
    batch = family.encode(processor, [Image.new("RGB", (224, 224))], ["Describe."], ["a ball"], max_length=64,
                          padding_side="right")  # fmt: skip
    assert (batch["input_ids"] == family.image_token_id).sum() == 4 and model(**batch).loss.isfinite()


def test_labels_follow_the_processors_ids_where_they_part_from_the_tokenizers(tmp_path):
    """Labels come from the tokenizer's character offsets, ids from the processor. Where the two part beside
    an image (here a tokenizer that puts SentencePiece's prefix space before every text, so the processor's
    blank lines after Gemma's image join the question's first word), the ids are the processor's and the
    replies still train exactly; where they part inside a reply, the record is refused at encode."""
    from tokenizers import pre_tokenizers

    from tiny_families import build_gemma3

    path = build_gemma3(tmp_path / "gemma")
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    family = family_for(AutoConfig.from_pretrained(path))
    image = Image.new("RGB", (32, 32))
    history = [("hi", "a red ball")]
    batch = family.encode(
        processor, [image], ["and?"], ["a ball"], max_length=64, padding_side="right", history=[history]
    )
    rendered = processor.apply_chat_template(family.messages([*history, ("and?", "a ball")]), tokenize=False)
    own = processor(images=[image], text=[rendered], add_special_tokens=False)["input_ids"][0]
    assert batch["input_ids"][0].tolist() == own[: batch["input_ids"].shape[1]]
    # they part after the image: the tokenizer's own ids after its placeholder are not the processor's
    mine = processor.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    tail = mine[mine.index(processor.tokenizer.convert_tokens_to_ids(family.image_token)) + 1 :]
    assert own[len(own) - len(tail) :] != tail
    labels = batch["labels"][0]
    trained = [t for t in labels.tolist() if t != IGNORE_INDEX]
    assert processor.tokenizer.decode(trained) == "a red ball<end_of_turn>a ball<end_of_turn>"

    class OtherTokens:
        """A processor whose ids for a reply are not its tokenizer's (as one from another checkpoint's)."""

        def __init__(self, inner):
            self.inner, self.tokenizer = inner, inner.tokenizer
            self.ball = self.tokenizer("ball", add_special_tokens=False)["input_ids"]

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, *args, **kwargs):
            out = self.inner(*args, **kwargs)
            ids = out["input_ids"][0].tolist()
            at = max(i for i in range(len(ids)) if ids[i : i + len(self.ball)] == self.ball)
            out["input_ids"][0, at] = self.tokenizer.convert_tokens_to_ids("<pad>")
            return out

    other = OtherTokens(processor)
    for _ in range(2):  # and again: every record is checked
        with pytest.raises(ValueError, match="tokenises this record's text differently from its tokenizer"):
            family.encode(other, [image], ["hi"], ["a ball"], max_length=64, padding_side="right")


def test_each_trained_group_can_have_its_own_learning_rate(qwen, tmp_path):
    from transformers import AutoModelForImageTextToText

    from vlmtune.modeling import add_lora, param_groups

    path, family, _ = qwen
    cfg = TrainConfig(
        model=path,
        train_modules=["projector", "vision"],
        lr=1e-3,
        lr_vision=1e-5,
        group_lr=["projector=5e-5"],
    )
    model = add_lora(AutoModelForImageTextToText.from_pretrained(path), family, cfg)
    groups = {g.get("name", "lora"): g for g in param_groups(model, family, cfg)}
    assert {k: g["lr"] for k, g in groups.items()} == {"lora": 1e-3, "vision": 1e-5, "projector": 5e-5}
    named = {id(p): n for n, p in model.named_parameters()}
    assert all("lora_" in named[id(p)] for p in groups["lora"]["params"])
    assert all(".merger.modules_to_save." in named[id(p)] for p in groups["projector"]["params"])
    vision = [named[id(p)] for p in groups["vision"]["params"]]
    assert vision and all(".modules_to_save." in n and ("patch_embed" in n or "blocks" in n) for n in vision)
    assert sum(len(g["params"]) for g in groups.values()) == sum(p.requires_grad for p in model.parameters())

    with pytest.raises(ConfigError) as e:
        train(TrainConfig(model=path, train_modules=["projector"], lr_vision=1e-5, group_lr=["projector:1"]))
    assert "--group-lr 'projector:1': give NAME=LR" in str(e.value)
    with pytest.raises(ConfigError, match="--group-lr vision: that group does not train"):
        train(TrainConfig(model=path, train_modules=["projector"], lr_vision=1e-5))


@pytest.mark.parametrize("kind", ["llava-next", "internvl", "smolvlm", "idefics3"])
def test_tiled_image_tokens_follow_the_image_and_a_mixed_batch_trains(kind, tmp_path, capsys):
    """LLaVA-NeXT's anyres, InternVL's and SmolVLM's tiles give a count that varies with the image's size:
    what `data check` reports (`image_tokens`) is what encode lays out and the model fills; images tiled into
    different grids share one batch."""
    from transformers import AutoModelForImageTextToText

    from tiny_families import BUILDERS, MEMBERS

    path = (BUILDERS | MEMBERS)[kind](tmp_path / kind)
    family = family_for(AutoConfig.from_pretrained(path))
    processor = AutoProcessor.from_pretrained(path)
    sizes = [(32, 32), (96, 32), (32, 96), (50, 70)]
    images = [Image.new("RGB", size, (200, 30, 30)) for size in sizes]
    counts = []
    for image in images:
        batch = family.encode(processor, [image], ["hi"], None, max_length=64, padding_side="left")
        counts.append(int((batch["input_ids"] == family.image_token_id).sum()))
        assert counts[-1] == family.image_tokens(processor, *image.size)
    assert len(set(counts)) > 1, counts
    # `data check` reports the same counts for a folder of these images
    folder = tmp_path / "data"
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    rows = [json.dumps({"file_name": f"{i}.png", "text": "a ball"}) for i in range(len(images))]
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    s = check(DataCheckConfig(data=str(folder), model=str(path), max_length=64))["splits"]["train"]
    assert s["image_tokens"] == f"min {min(counts)}, median {statistics.median(counts):g}, max {max(counts)}"
    assert (
        f"image tokens per image: {s['image_tokens']} (as the processor tiles them)"
        in capsys.readouterr().out
    )
    batch = family.encode(processor, images, ["hi"] * 4, ["a ball"] * 4, max_length=64, padding_side="right")
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert model(**batch).loss.isfinite()
