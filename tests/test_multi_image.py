"""Several images per record, end to end: the chat families train on conversations whose turns show several
images of different sizes (with and without the feature cache, the same adapter), answer about several images
through `ask`, the server and `evaluate`; a family that reads one image refuses such records by row."""

from __future__ import annotations

import base64
import io
import json
import random
import statistics

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoProcessor

from tiny_families import BUILDERS
from vlmtune.cli import main
from vlmtune.config import DataCheckConfig, TrainConfig
from vlmtune.data import layouts
from vlmtune.data.checks import check
from vlmtune.errors import DataError
from vlmtune.families import family_for
from vlmtune.infer import Captioner
from vlmtune.rundir import read_jsonl
from vlmtune.training.run import train

COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 200, 40), "white": (250, 250, 250)}
SIZES = [(32, 32), (64, 32), (32, 64), (48, 40)]  # tiled, resized and padded differently by each family
ASKED = "Which colours?"


def dialogues(n: int, seed: int = 0) -> list[layouts.Dialogue]:
    """Two images with the first question ("red then blue"); every other record shows a third with a second
    question, whose answer is its colour."""
    rng = random.Random(seed)

    def image(colour: str) -> Image.Image:
        return Image.new("RGB", rng.choice(SIZES), COLOURS[colour])

    out = []
    for k in range(n):
        a, b, c = rng.sample(list(COLOURS), 3)
        first = (ASKED, f"{a} then {b}")
        if k % 2:
            out.append(([[image(a), image(b)], [image(c)]], [first, ("And this one?", c)]))
        else:
            out.append(([[image(a), image(b)]], [first]))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(layouts.write("sharegpt", dialogues(8) * 2, tmp_path_factory.mktemp("multi")))


def test_a_family_that_reads_one_image_refuses_records_with_more(data, tmp_path):
    with pytest.raises(DataError) as e:
        train(TrainConfig(model="tiny", data=data, output=str(tmp_path / "run")))
    assert "row 0, images: 2 images; this model reads at most 1 per conversation" in str(e.value)
    assert "row 1, images: 3 images" in str(e.value) and "--skip-bad" in str(e.value)


def test_data_check_reports_the_images_of_each_conversation(data, tmp_path, capsys):
    model = BUILDERS["qwen2-vl"](tmp_path / "qwen")
    s = check(DataCheckConfig(data=data, model=str(model), max_length=128))["splits"]["train"]
    assert s["bad"] == [] and s["images_per_conversation"] == "min 2, median 2.5, max 3"
    family, processor = family_for(AutoConfig.from_pretrained(model)), AutoProcessor.from_pretrained(model)
    shown = [image for images, _ in dialogues(8) * 2 for turn in images for image in turn]
    counts = [family.image_tokens(processor, *image.size) for image in shown]
    assert len(set(counts)) > 1
    assert s["image_tokens"] == f"min {min(counts)}, median {statistics.median(counts):g}, max {max(counts)}"
    assert "images per conversation: min 2, median 2.5, max 3" in capsys.readouterr().out


def short(model: str, data: str, out, *extra: str) -> list[str]:
    return [
        "train", "--model", model, "--data", data, "--output", str(out), "--batch-size", "4", "--lr", "1e-2",
        "--lora-r", "8", "--lora-dropout", "0", "--sample-every", "0", "--num-samples", "0", "--log-every", "1",
        "--max-length", "96", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen3-vl", "gemma-3", "llava-next", "internvl", "smolvlm"])
def test_the_cache_keeps_each_records_images_and_trains_the_same_adapter(kind, data, tmp_path, capsys):
    """Records of two or three images of different sizes: their features kept as one run per record, their
    text laid out from stand-ins of the same sizes; the adapter is the one training from pixels gives."""
    model = BUILDERS[kind](tmp_path / kind)
    adapters = {}
    for cache in ("auto", "off"):
        out = tmp_path / cache
        assert main(short(str(model), data, out, "--max-steps", "4", "--vision-cache", cache)) == 0
        adapters[cache] = load_file(str(out / "adapter_model.safetensors"))
    assert "image feature cache: on (vision side frozen" in capsys.readouterr().out
    assert any(w.abs().sum() > 0 for name, w in adapters["off"].items() if "lora_B" in name)  # it trained
    for name, weight in adapters["auto"].items():
        other = adapters["off"][name]
        assert torch.allclose(weight, other, rtol=1e-4, atol=1e-5), (
            name,
            float((weight - other).abs().max()),
        )


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.slow
def test_a_chat_family_learns_from_every_image_and_answers_about_several(data, tmp_path, capsys):
    model = str(BUILDERS["qwen2-vl"](tmp_path / "qwen"))
    run = tmp_path / "run"
    args = short(model, data, run, "--epochs", "30", "--train-modules", "projector", "vision")
    assert main(args) == 0
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0] / 4, losses
    captioner = Captioner.from_run(str(run), dtype="float32")
    family, processor = captioner.family, captioner.processor
    # The second image conditions the answer: without it (a blank in its place), the answer costs more.
    records = dialogues(8)
    images = [shown[0] for shown, _ in records]
    replies = [exchanges[0][1] for _, exchanges in records]
    blank = [[a, Image.new("RGB", b.size, (128, 128, 128))] for a, b in images]
    prompts = [ASKED] * len(records)

    def loss(shown) -> float:
        batch = family.encode(processor, shown, prompts, replies, max_length=96, padding_side="right")
        with torch.no_grad():
            return captioner.model(**batch).loss.item()

    assert loss(images) < 0.5 * loss(blank), (loss(images), loss(blank))
    said = captioner.generate(images, prompts, max_new_tokens=10)
    assert sum(got == want for got, want in zip(said, replies, strict=True)) >= 6, said

    # `ask` with two images answers as the captioner does
    paths = []
    for k, image in enumerate(images[0]):
        paths.append(tmp_path / f"{k}.png")
        image.save(paths[-1])
    capsys.readouterr()
    assert main(["ask", *map(str, paths), ASKED, "--run", str(run), "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.strip() == said[0]
    # and so does the server, given two image_url parts and then a third image in a later turn
    from fastapi.testclient import TestClient
    from openai import OpenAI

    from vlmtune.config import ServeConfig
    from vlmtune.serve.app import create_app
    from vlmtune.serve.engine import Engine

    shown, exchanges = records[1]
    third = shown[1][0]
    messages = [
        {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": data_uri(i)}} for i in shown[0]),
                                     {"type": "text", "text": ASKED}]},
        {"role": "assistant", "content": exchanges[0][1]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(third)}},
                                     {"type": "text", "text": "And this one?"}]},
    ]  # fmt: skip
    reference = captioner.reply([*shown[0], third], messages_without_urls(messages), max_new_tokens=10)
    engine = Engine.load({"ft": str(run)}, None, dtype="float32")
    with TestClient(create_app(engine, ServeConfig(run=[f"ft={run}"]))) as http:
        client = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        reply = client.chat.completions.create(model="ft", messages=messages, max_tokens=10)
    assert reply.choices[0].message.content == reference
    # `evaluate --run` replies to every turn, each after the images its turns showed
    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(run), "--data", data, "--limit", "8", "--output", str(out)]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["turns"] == 12 and summary["metrics"]["fine-tuned"]["exact match"] > 0.5, summary


def test_chat_shows_added_images_with_the_next_line(tmp_path, monkeypatch, capsys):
    """`vlmtune chat A B`, then `/add C` before the next line: each user turn shows its images, and the
    replies are the captioner's for that conversation; a family that reads one image refuses the second."""
    from vlmtune.config import ChatConfig
    from vlmtune.infer import chat

    model = str(BUILDERS["qwen2-vl"](tmp_path / "qwen"))
    (shown, _), *_ = dialogues(2, seed=3)
    paths = []
    for k, image in enumerate([*shown[0], Image.new("RGB", (48, 40), COLOURS["green"])]):
        paths.append(str(tmp_path / f"{k}.png"))
        image.save(paths[-1])
    lines = iter([ASKED, f"/add {paths[2]}", "And this one?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    chat(ChatConfig(images=paths[:2], model=model, max_new_tokens=5))
    said = [line.split("model> ", 1)[1] for line in capsys.readouterr().out.splitlines() if "model> " in line]
    captioner = Captioner.from_model(model)
    opened = [Image.open(p).convert("RGB") for p in paths]
    first = [{"role": "user", "content": f"<image><image>{ASKED}"}]
    assert said[0] == captioner.reply(opened[:2], first, max_new_tokens=5)
    then = [
        *first,
        {"role": "assistant", "content": said[0]},
        {"role": "user", "content": "<image>And this one?"},
    ]
    assert said[1] == captioner.reply(opened, then, max_new_tokens=5)

    lines = iter([f"/add {paths[1]}", "/quit"])
    chat(ChatConfig(images=paths[:1], model="tiny"))
    assert "error: 2 images given; blip-2 reads at most 1 per question" in capsys.readouterr().out


def messages_without_urls(messages: list[dict]) -> list[dict]:
    """The same conversation with its images as bare image parts (the images given apart, in order)."""
    return [
        {**m, "content": [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in messages
    ]
