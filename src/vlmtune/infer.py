"""Captioning and question answering with a base model or a run directory: batched, left-padded generation."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import AskConfig, CaptionConfig, ChatConfig
from .data.conversations import parse
from .data.examples import Prompting
from .data.images import expand_images, open_image
from .errors import DataError
from .families import Family
from .families.base import Images
from .modeling import default_device, describe_for_inference, load_for_inference, pick_dtype


@dataclass
class Captioner:
    """A loaded model ready to caption and answer. Build it with `from_run` or `from_model`."""

    model: Any
    processor: Any
    family: Family
    prompt: str = ""  # the prompt the run was trained with, so captions continue it the same way
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    vllm: Any = None  # a `VllmGenerator`: generation on vLLM (`--engine vllm`), and no `model`
    adapter: str | None = None  # the run's adapter, by its name in `vllm`

    @classmethod
    def load(
        cls,
        run: str | None = None,
        model: str | None = None,
        dtype: str = "auto",
        engine: str = "transformers",
    ) -> Captioner:
        if engine == "vllm":
            return cls.on_vllm(run, model, dtype)
        device = default_device()
        m, processor, family, info = load_for_inference(run, model, dtype, device)
        return cls(m, processor, family, trained_prompt(info, family), pick_dtype(dtype, device), device)

    @classmethod
    def on_vllm(cls, run: str | None, model: str | None, dtype: str = "auto") -> Captioner:
        """The base (and the run's adapter) on vLLM: the processor and family as `load` has them."""
        from .vllm_engine import VllmGenerator

        base, processor, family, info = describe_for_inference(run, model)
        runs = {"run": run} if run is not None else {}
        generator = VllmGenerator(base, family, processor, runs, dtype)
        return cls(
            None,
            processor,
            family,
            trained_prompt(info, family),
            vllm=generator,
            adapter="run" if run else None,
        )

    @classmethod
    def from_run(cls, run: str, dtype: str = "auto") -> Captioner:
        return cls.load(run=run, dtype=dtype)

    @classmethod
    def from_model(cls, model: str, dtype: str = "auto") -> Captioner:
        return cls.load(model=model, dtype=dtype)

    def generate(
        self,
        images: Images,
        prompts: Sequence[str],
        *,
        batch_size: int = 8,
        history: Sequence[Sequence[tuple[str, str]]] | None = None,
        turn_images: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """One continuation per (image, prompt): each item of `images` an image, or a list of images (families
        that read several); after its `history` of rendered exchanges, if given, with `turn_images` saying
        how many images each of its turns holds (by default all in the first). `batch_size` at a time;
        keyword arguments go to `generate`."""
        kwargs.setdefault("max_new_tokens", 40)
        if self.vllm is not None:  # vLLM batches as it goes: all at once
            rows = self.vllm.generate(
                images, prompts, history=history, turn_images=turn_images, adapter=self.adapter, **kwargs
            )
            return [self.family.decode(self.processor, row) for row in rows]
        out: list[str] = []
        for i in range(0, len(images), batch_size):
            rows = slice(i, i + batch_size)
            batch = self.family.generation_inputs(
                self.processor,
                images[rows],
                prompts[rows],
                self.device,
                self.dtype,
                history=None if history is None else history[rows],
                turn_images=None if turn_images is None else turn_images[rows],
            )
            out += self.family.generate(self.model, self.processor, batch, **kwargs)
        return out

    def caption(
        self, images: Images, prompt: str | None = None, *, batch_size: int = 8, **kwargs: Any
    ) -> list[str]:
        """Captions for `images` (continuing the run's training prompt unless `prompt` is given); an item that
        is a list of images gets one caption for all of them."""
        prompt = self.prompt if prompt is None else prompt
        return self.generate(images, [prompt] * len(images), batch_size=batch_size, **kwargs)

    def answer(
        self, images: Images, questions: Sequence[str], *, batch_size: int = 8, **kwargs: Any
    ) -> list[str]:
        """Answers to one question per image (or list of images), in the family's question format."""
        prompts = [self.family.format_question(q) for q in questions]
        return self.generate(images, prompts, batch_size=batch_size, **kwargs)

    def ask(self, image: Any, question: str, template: str | None = None, **kwargs: Any) -> str:
        """The answer to `question` about `image` (or a list of images)."""
        return self.generate([image], [self.family.format_question(question, template)], **kwargs)[0]

    def prompting(self, template: str | None = None) -> Prompting:
        return Prompting(self.prompt, None, template or self.family.question_template)

    def reply(self, images: Any, messages: Any, template: str | None = None, **kwargs: Any) -> str:
        """The next assistant turn of a conversation about `images` (one image, or a list in the order the
        conversation shows them): `messages` in any conversation layout (system and earlier turns included,
        each image marked `<image>` or an image part where its turn shows it, or not at all: then all go
        with the first user turn), ending with a user turn; rendered as training renders them."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        d = self.prompting(template).reply_to(parse(messages, images, training=False))
        return self.generate(
            [images], [d.prompt], history=[d.history], turn_images=[d.turn_images], **kwargs
        )[0]


def trained_prompt(info: dict[str, Any], family: Family) -> str:
    """The caption prompt a run trained with (its recorded config), or the family's for a bare base."""
    prompt = info.get("config", {}).get("prompt")
    return family.caption_prompt if prompt is None else prompt


def _batches(paths: list[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(paths), size):
        yield paths[i : i + size]


def caption(cfg: CaptionConfig) -> list[tuple[str, str]]:
    """Caption every image in `cfg.images`; print `path<TAB>caption` or write JSONL/CSV to `cfg.output`."""
    paths = expand_images(cfg.images)  # a missing file fails before the model loads
    if cfg.output and Path(cfg.output).suffix not in (".jsonl", ".csv"):
        raise ValueError(f"--output {cfg.output}: use a .jsonl or .csv file name")
    captioner = Captioner.load(cfg.run, cfg.model, cfg.dtype, cfg.engine)
    prompt = cfg.prompt or None
    results: list[tuple[str, str]] = []
    for chunk in _batches(paths, cfg.batch_size):
        images = [open_image(p) for p in chunk]
        texts = captioner.caption(
            images, prompt, batch_size=len(images), max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams
        )
        for p, t in zip(chunk, texts, strict=True):
            results.append((str(p), t))
            if not cfg.output:
                print(f"{p}\t{t}", flush=True)
    if cfg.output:
        _write(Path(cfg.output), results)
    return results


def _write(path: Path, results: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        if path.suffix == ".csv":
            w = csv.writer(f)
            w.writerow(["path", "caption"])
            w.writerows(results)
        else:
            for p, t in results:
                f.write(json.dumps({"path": p, "caption": t}) + "\n")
    print(f"wrote {len(results)} captions to {path}")


def ask(cfg: AskConfig) -> str:
    """Answer `cfg.question` about `cfg.images`; prints and returns the answer."""
    images = [open_image(p) for p in cfg.images]
    if not cfg.question.strip():
        raise ValueError("the question is empty")
    history = _history(cfg.history, cfg.images) if cfg.history else None  # a bad file fails before loading
    captioner = Captioner.load(cfg.run, cfg.model, cfg.dtype)
    _check_count(captioner.family, len(images))
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams)
    if history is None:
        answer = captioner.ask(images, cfg.question, cfg.template, **kwargs)
    else:
        messages = [*history, {"role": "user", "content": cfg.question}]
        answer = captioner.reply(images, messages, cfg.template, **kwargs)
    print(answer)
    return answer


def _check_count(family: Family, n: int) -> None:
    if family.max_images is not None and n > family.max_images:
        raise ValueError(f"{n} images given; {family.name} reads at most {family.max_images} per question")


def _history(path: str, images: Sequence[str]) -> list[Any]:
    """A conversation so far from a JSON file: a list of messages, or a record holding `messages` or
    `conversations` (LLaVA's); checked now, so a bad file fails before the model loads."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"--history {path}: cannot read it as JSON ({e})") from None
    if isinstance(doc, dict):
        doc = doc.get("messages", doc.get("conversations"))
    if not isinstance(doc, list):
        raise DataError(f"--history {path}: expected a list of messages (role + content)")
    try:
        parse(doc + [{"role": "user", "content": "?"}], list(images), training=False)  # images come apart
    except DataError as e:
        raise DataError(f"--history {path}: {e}") from None
    return doc


def _user_turn(text: str, shown: int) -> dict[str, Any]:
    """A user message that shows `shown` new images before its text."""
    return {"role": "user", "content": [{"type": "image"}] * shown + [{"type": "text", "text": text}]}


def chat(cfg: ChatConfig) -> list[dict[str, Any]]:
    """A conversation in the terminal: each line you type is a user turn, answered with the whole history.
    `/new` starts over, `/image PATH...` switches images (and starts over), `/add PATH...` shows more images
    with your next line (families that read several), `/quit` (or end of input) stops. Returns the last
    conversation's messages."""
    opened = [open_image(p) for p in cfg.images]
    captioner = Captioner.load(cfg.run, cfg.model, cfg.dtype)
    _check_count(captioner.family, len(opened))
    start = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages, images, pending = list(start), [], opened  # images shown so far; to show with the next line
    print(
        "chat about the image: /new restarts, /image PATH switches, /add PATH shows another, /quit stops",
        flush=True,
    )
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        command, _, rest = line.partition(" ")
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/new":
            messages, images, pending = list(start), [], opened
            print("(new conversation)", flush=True)
            continue
        if command in ("/image", "/add"):
            try:
                more = [open_image(p) for p in rest.split()]
                if not more:
                    raise DataError(f"{command} needs one or more image paths")
                kept = len(images) + len(pending) if command == "/add" else 0
                _check_count(captioner.family, kept + len(more))
            except (DataError, ValueError) as e:
                print(f"error: {e}", flush=True)
                continue
            if command == "/image":
                opened = more
                messages, images, pending = list(start), [], opened
                print("(new image, new conversation)", flush=True)
            else:
                pending = pending + more
                print(f"({len(pending)} image(s) go with your next line)", flush=True)
            continue
        messages.append(_user_turn(line, len(pending)))
        images, pending = images + pending, []
        reply = captioner.reply(images, messages, max_new_tokens=cfg.max_new_tokens)
        messages.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", flush=True)
    return messages
