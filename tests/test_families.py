"""The family contract: every registered family, on a tiny checkpoint saved in its standard layout, does the
whole job through vlmtune's real commands. A new family passes it by adding itself to FAMILIES and a builder
to tests/tiny_families.py; nothing here names a family's modules or tokens.

Per family: encode trains exactly the target and the end token; `vlmtune train --model DIR` lowers the loss
and the image conditions the output (real image loss < blank image loss); caption and ask; the adapter loads
with plain peft + transformers, and the merged model with plain transformers, giving the same captions; the
feature cache (where one applies) trains the same adapter as without it; the server answers the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from tiny_families import BUILDERS, IMAGE, colour_examples
from vlmtune.cli import main
from vlmtune.families import FAMILIES, IGNORE_INDEX, family_for
from vlmtune.infer import Captioner
from vlmtune.rundir import read_jsonl

# The shipped, pretrained tiny BLIP-2 OPT stands for its family; the others are built from config here.
KINDS = ["blip-2", *BUILDERS]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-families")
    return {"blip-2": tiny_path} | {k: str(build(root / k)) for k, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> str:
    """Four colour images, one caption each, as an image folder (repeated so an epoch is a few steps)."""
    folder = tmp_path_factory.mktemp("colours")
    lines = []
    for i, (image, caption) in enumerate(colour_examples() * 4):
        image.save(folder / f"{i:02d}.png")
        lines.append(json.dumps({"file_name": f"{i:02d}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder)


def train_args(model: str, data: str, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", model, "--data", data, "--output", str(out), "--epochs", "40", "--batch-size", "4",
        "--lr", "1e-2", "--lora-r", "8", "--lora-dropout", "0", "--sample-every", "0", "--log-every", "1",
        "--max-length", "48", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(checkpoints, colours, tmp_path_factory) -> dict[str, Path]:
    """One fine-tuned run per family, through the CLI."""
    root = tmp_path_factory.mktemp("family-runs")
    out = {}
    for kind, model in checkpoints.items():
        # A random Q-Former hands on nearly the same features for every image: the random checkpoints train
        # every group too; the pretrained tiny BLIP-2 trains LoRA alone, at its demo's learning rate.
        groups = list(loaded(model)[0].groups)
        extra = (["--train-modules", *groups] if groups else []) if kind in BUILDERS else ["--lr", "3e-3"]
        assert main(train_args(model, colours, root / kind, *extra)) == 0, kind

        out[kind] = root / kind
    return out


def loaded(path: str):
    config = AutoConfig.from_pretrained(path)
    return family_for(config), AutoProcessor.from_pretrained(path), config


def test_every_registered_family_has_a_tiny_checkpoint(checkpoints):
    covered = {type(loaded(path)[0]) for path in checkpoints.values()}
    assert covered == set(FAMILIES)


@pytest.mark.parametrize("kind", KINDS)
def test_encode_trains_exactly_the_target_and_the_end_token(kind, checkpoints):
    family, processor, config = loaded(checkpoints[kind])
    one_sequence = not config.get_text_config().is_encoder_decoder  # else the labels are the decoder's own
    tok = processor.tokenizer
    images = [image for image, _ in colour_examples(2)]
    captions = ["a red ball", "two players in white jerseys near the goal"]
    for prompt in (family.caption_prompt, family.format_question("what colour is the ball?")):
        batch = family.encode(processor, images, [prompt] * 2, captions, max_length=64, padding_side="right")
        for i, caption in enumerate(captions):
            labels = batch["labels"][i]
            trained = labels[labels != IGNORE_INDEX].tolist()
            assert trained[-1] == family.end_token_id  # one end token, last
            assert not family.end_token_ids & set(trained[:-1])
            assert tok.decode(trained[:-1], skip_special_tokens=True).strip() == caption
            # Trained positions are one contiguous span, and no prompt, image or padding position is trained.
            where = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
            assert where == list(range(where[0], where[0] + len(trained)))
            if one_sequence:  # the span follows the prompt
                prompt_only = family.encode(
                    processor, images[:1], [prompt], None, max_length=64, padding_side="right"
                )
                assert where[0] == prompt_only["input_ids"].shape[1]
                assert (batch["attention_mask"][i, where] == 1).all()
    # What `data check` reports an example spends of --max-length is what encode spends: one token less and
    # the target is cut (it loses its end token), exactly that many and it is whole.
    caption = "two players in white jerseys near the goal on the left of the ball and a red ball on the right"
    for prompt in (family.caption_prompt, family.format_question("how many?")):
        need = family.text_tokens(processor, prompt, caption)
        for budget, whole in ((need, True), (need - 1, False)):
            got = family.encode(
                processor, images[:1], [prompt], [caption], max_length=budget, padding_side="right"
            )
            labels = got["labels"][0][got["labels"][0] != IGNORE_INDEX].tolist()
            assert (labels[-1] == family.end_token_id) == whole, (prompt, caption, budget)
    # A target cut by max_length gets no end token: the model never learns to stop mid-sentence.
    budget = family.text_tokens(processor, "", "a") + 8  # the prompt (a chat template's too) and 8 more
    long = family.encode(
        processor, images[:1], [""], ["a player " * 40], max_length=budget, padding_side="right"
    )
    cut = long["labels"][0][long["labels"][0] != IGNORE_INDEX].tolist()
    assert cut and not family.end_token_ids & set(cut)
    # Generation inputs carry no labels; a decoder-only model's are left-padded, so generation continues each
    # prompt (an encoder-decoder's decoder starts apart from its encoder's rows).
    gen = family.encode(
        processor, images, ["", family.format_question("how many?")], None, max_length=40, padding_side="left"
    )
    assert "labels" not in gen
    assert (gen["attention_mask"][:, -1] == 1).all() or not one_sequence


@pytest.mark.parametrize("kind", KINDS)
def test_the_frozen_image_side_keeps_no_graph(kind, checkpoints, tmp_path):
    """With gradient checkpointing (where peft makes every input embedding's output require grad, a vision
    tower's patch embedding's too), the frozen modules of the image path run without autograd: no output of
    theirs needs a gradient, so none keeps a graph; LoRA still gets its gradients. (BLIP's text decoder takes
    no checkpointing: it runs without.)"""
    from accelerate import Accelerator

    from vlmtune.config import TrainConfig
    from vlmtune.training.run import _load_model

    family = loaded(checkpoints[kind])[0]
    frozen = family.frozen_modules([])
    lm = family.language_model(AutoModelForImageTextToText.from_pretrained(checkpoints[kind]))
    checkpointing = lm.supports_gradient_checkpointing  # BLIP's text decoder does not
    cfg = TrainConfig(
        model=checkpoints[kind], output=str(tmp_path / "run"), gradient_checkpointing=checkpointing
    )
    model, processor, family = _load_model(cfg, Accelerator(cpu=True))
    needs_grad = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in frozen:
            module.register_forward_hook(
                lambda m, i, out, name=name: needs_grad.extend(name for t in _tensors(out) if t.requires_grad)
            )
    model.train()
    image, caption = colour_examples(1)[0]
    batch = family.encode(
        processor, [image], [family.caption_prompt], [caption], max_length=48, padding_side="right"
    )
    model(**batch).loss.backward()
    assert frozen and needs_grad == []
    lora_b = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(g is not None for g in lora_b) and any(g.abs().sum() > 0 for g in lora_b)


@pytest.mark.parametrize("kind", KINDS)
def test_the_chunked_loss_is_the_models_own(kind, checkpoints):
    """`--loss-chunk`: the output layer applied to the target positions only, a few at a time, gives the
    model's own loss and the same gradient to every trainable weight (the head trained too, where it can be);
    a model that scores its loss itself is refused by name."""
    from vlmtune.config import TrainConfig
    from vlmtune.modeling import add_lora
    from vlmtune.training.loss import training_loss, transformers_model

    family, processor, _ = loaded(checkpoints[kind])
    torch.manual_seed(0)
    model = add_lora(
        AutoModelForImageTextToText.from_pretrained(checkpoints[kind]), family, TrainConfig(lora_dropout=0.0)
    )
    images = [image for image, _ in colour_examples(2)]
    prompts = [family.caption_prompt, family.format_question("what colour is the ball?")]
    batch = family.encode(
        processor, images, prompts, ["a red ball", "red"], max_length=48, padding_side="right"
    )
    if family.own_loss():  # refused when asked for, the model's own loss by default
        with pytest.raises(ValueError, match=family.name):
            training_loss(model, family, batch, 3)
        assert torch.equal(training_loss(model, family, dict(batch)), model(**batch).loss)
        return
    head = transformers_model(model).get_output_embeddings()
    head.weight.requires_grad_(True)  # its gradient is checked too (tied to the input embeddings or not)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(chunk: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss = training_loss(model, family, dict(batch), chunk)
        grads = torch.autograd.grad(loss, trainable)
        return loss.detach(), grads

    own, own_grads = loss_and_grads(0)
    for chunk in (3, None):  # several chunks (the targets are 4 to 7 tokens a row), and the default: one
        loss, grads = loss_and_grads(chunk)
        assert torch.allclose(loss, own, rtol=1e-5), (chunk, float(loss), float(own))
        for p, g, o in zip(trainable, grads, own_grads, strict=True):
            assert torch.allclose(g, o, rtol=1e-4, atol=1e-5), (chunk, p.shape, float((g - o).abs().max()))
    # and the model is as it was: its output layer gives logits again, its loss is its own
    assert model(**batch).logits.shape[-1] == head.out_features
    assert torch.allclose(training_loss(model, family, dict(batch), 0), own)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_to_a_multiple_changes_no_loss(kind, checkpoints):
    """--pad-to-multiple-of (on by default with --compile, for fixed shapes): rows padded on past their end
    score the same loss, whatever the family keeps per position (masks, token types, image-token marks)."""
    from vlmtune.data.batching import pad_to_multiple

    family, processor, _ = loaded(checkpoints[kind])
    model = AutoModelForImageTextToText.from_pretrained(checkpoints[kind]).eval()
    images = [image for image, _ in colour_examples(2)]
    prompts = [family.caption_prompt, family.format_question("what colour is the ball?")]
    batch = family.encode(
        processor, images, prompts, ["a red ball", "red"], max_length=48, padding_side="right"
    )
    own = model(**batch).loss
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)  # never padded past
    grew = 0
    for multiple in (16, 128):
        padded = pad_to_multiple(batch, multiple, processor.tokenizer.pad_token_id, limit)
        assert padded["input_ids"].shape[1] in (limit, -(-batch["input_ids"].shape[1] // multiple) * multiple)
        grew += padded["input_ids"].shape[1] > batch["input_ids"].shape[1]
        assert torch.allclose(model(**padded).loss, own, rtol=1e-5), multiple
    assert grew


def _tensors(out) -> list:
    """The tensors of a module's output (a tensor, a tuple, a ModelOutput)."""
    if torch.is_tensor(out):
        return [out]
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    return [t for v in values for t in _tensors(v)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_training_lowers_the_loss_and_the_image_conditions_the_output(kind, runs, checkpoints):
    losses = [r["loss"] for r in read_jsonl(runs[kind] / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0] / 2, losses
    captioner = Captioner.from_run(str(runs[kind]), dtype="float32")
    family, processor, model = captioner.family, captioner.processor, captioner.model
    pairs = colour_examples()
    prompts = [captioner.prompt] * len(pairs)
    real = family.encode(
        processor, [i for i, _ in pairs], prompts, [c for _, c in pairs], max_length=32, padding_side="right"
    )
    blank = dict(real, pixel_values=family.encode(processor, [Image.new("RGB", (IMAGE, IMAGE), (128,) * 3)] * len(pairs), prompts, [c for _, c in pairs], max_length=32, padding_side="right")["pixel_values"])  # fmt: skip
    with torch.no_grad():
        real_loss, blank_loss = model(**real).loss.item(), model(**blank).loss.item()
    assert real_loss < 0.5 * blank_loss, (real_loss, blank_loss)
    # And it says what it was taught for most of the images.
    right = sum(
        got == want for got, (_, want) in zip(captioner.caption([i for i, _ in pairs]), pairs, strict=True)
    )
    assert right >= 3, captioner.caption([i for i, _ in pairs])


def cli_captions(args: list[str], capsys) -> dict[str, str]:
    assert main(args) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines() if "\t" in line]
    return {Path(p).name: c for p, c in rows}


def plain_captions(model, processor, family, paths: list[Path], prompt: str) -> dict[str, str]:
    """Plain transformers: processor(images, text) -> the model's own generate -> decode up to the end token,
    in one batch as `vlmtune caption` runs it (the same prompt: no padding)."""
    images = [Image.open(p).convert("RGB") for p in paths]
    kwargs = {}
    if getattr(processor, "chat_template", None):  # a chat model is prompted through its template
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # one image list per text; the tokenizer's <bos> only where the template wrote none (Gemma's does)
        bos = processor.tokenizer.bos_token
        images, kwargs = (
            [[image] for image in images],
            {"add_special_tokens": not (bos and prompt.startswith(bos))},
        )
    inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt", **kwargs)
    out = model.generate(**inputs, max_new_tokens=40, do_sample=False).tolist()
    if not model.config.get_text_config().is_encoder_decoder:
        # the prompt comes back too (BLIP's generate drops the last prompt token, its [SEP])
        out = [ids[inputs["input_ids"].shape[1] - (family.name == "blip") :] for ids in out]
    else:  # the decoder's start token first (BART's is its `</s>`, which would end the text at once)
        out = [ids[1:] for ids in out]
    texts = [processor.tokenizer.decode(family.cut(ids), skip_special_tokens=True).strip() for ids in out]
    return {p.name: t for p, t in zip(paths, texts, strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
# peft 0.21's own PeftModel.from_pretrained reads a property transformers 5.24 deprecated: not vlmtune's call.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_caption_ask_plain_peft_and_merge_agree(kind, runs, checkpoints, tmp_path, capsys):
    from peft import PeftModel

    paths = []
    for i, (image, _) in enumerate(colour_examples()):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    run = str(runs[kind])
    ours = cli_captions(["caption", *map(str, paths), "--run", run], capsys)
    captioner = Captioner.from_run(run)
    assert list(ours.values()) == captioner.caption(
        [Image.open(p).convert("RGB") for p in paths], max_new_tokens=40
    )
    assert main(["ask", str(paths[0]), "what colour is the ball?", "--run", run]) == 0
    question = [Image.open(paths[0]).convert("RGB")], ["what colour is the ball?"]
    answer = captioner.answer(*question, max_new_tokens=20)[0]  # `ask`'s default length
    assert capsys.readouterr().out.strip() == answer
    family, processor = captioner.family, captioner.processor
    base = AutoModelForImageTextToText.from_pretrained(checkpoints[kind])
    plain = PeftModel.from_pretrained(base, run).eval()
    prompt = captioner.prompt
    assert plain_captions(plain, processor, family, paths, prompt) == ours
    assert main(["merge", run, str(tmp_path / "merged")]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    assert plain_captions(merged, processor, family, paths, prompt) == ours


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_scores_what_the_run_says(kind, runs, colours, tmp_path):
    """`vlmtune evaluate --run` captions the images with the run and scores them against their references:
    the run learnt the colour captions, so its scores are high."""
    out = tmp_path / "eval"
    assert (
        main(["evaluate", "--run", str(runs[kind]), "--data", colours, "--limit", "4", "--output", str(out)])
        == 0
    )
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["images"] == 4
    scores = summary["metrics"]["fine-tuned"]
    assert scores["BLEU-4"] > 0.5 and scores["CIDEr-D"] > 1.0, scores


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_the_feature_cache_trains_the_same_adapter(kind, checkpoints, colours, tmp_path):
    family, _, _ = loaded(checkpoints[kind])
    model = AutoModelForImageTextToText.from_pretrained(checkpoints[kind])
    # with every group training where the family caches what comes before them, else with none
    groups = list(family.groups)
    if family.cache_level(groups, model)[0] is None:
        groups = []
    level, why = family.cache_level(groups, model)
    if level is None:
        pytest.skip(f"no cache for {kind}: {why}")
    adapters = {}
    for cache in ("auto", "off"):
        out = tmp_path / cache
        extra = [
            "--max-steps",
            "4",
            "--vision-cache",
            cache,
            *(["--train-modules", *groups] if groups else []),
        ]
        assert main(train_args(checkpoints[kind], colours, out, *extra)) == 0
        adapters[cache] = load_file(str(out / "adapter_model.safetensors"))
    assert adapters["auto"].keys() == adapters["off"].keys()
    for name, weight in adapters["auto"].items():
        other = adapters["off"][name]
        assert torch.allclose(weight, other, rtol=1e-4, atol=1e-5), (
            name,
            float((weight - other).abs().max()),
        )


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_serve_answers_as_caption_does(kind, runs):
    from vlmtune.serve.engine import Engine, Job

    engine = Engine.load({"ft": str(runs[kind])}, None, dtype="float32")
    adapter = engine.adapter("ft")
    images = [image for image, _ in colour_examples()]
    jobs = [Job(image, adapter.prompt, adapter, max_tokens=20) for image in images]
    jobs.append(
        Job(images[0], engine.family.format_question("what colour is the ball?"), adapter, max_tokens=3)
    )
    got = [r.text for r in engine.run(jobs)]
    captioner = Captioner.from_run(str(runs[kind]), dtype="float32")
    assert got[:-1] == captioner.caption(images, max_new_tokens=20)
    assert got[-1] == captioner.answer(images[:1], ["what colour is the ball?"], max_new_tokens=3)[0]
    # and through the HTTP API with the official OpenAI client (the app in process: no port, no start-up)
    import base64
    import io

    from fastapi.testclient import TestClient
    from openai import OpenAI

    from vlmtune.config import ServeConfig
    from vlmtune.serve.app import create_app

    buffer = io.BytesIO()
    images[1].save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with TestClient(create_app(engine, ServeConfig(run=[f"ft={runs[kind]}"]))) as http:
        client = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        reply = client.chat.completions.create(
            model="ft",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}],
            max_tokens=20,
        )
    assert reply.choices[0].message.content == got[1]
