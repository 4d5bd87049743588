"""Families whose instruct checkpoints read a conversation through their processor's chat template (Qwen-VL,
and the chat families after it). The template is the authority: vlmtune renders with it, never by hand.

How an example becomes tokens and labels, with nothing but the template:

    head_1 = render([user_1], add_generation_prompt=True)      system, user turn, image, "assistant" header
    whole_1 = render([user_1, assistant_1])                     ... + reply_1 + end of turn (+ what follows it)
    head_2 = render([user_1, assistant_1, user_2], True)        ...

Each reply is the text `whole_k` adds to `head_k`, up to and including the end-of-turn token; everything
else (system, user turns, image, the assistant headers, what follows an end of turn) is never trained. Each
piece is tokenised on its own and the pieces joined (a template puts special tokens at every boundary, so
the ids are those of the whole rendered text). That is checked once per processor against the processor's
own ids for a whole rendered dialogue, and a tokenizer for which it fails is refused before any step. The
image placeholder the template writes is expanded by the processor into as many tokens as the image gives,
and the count is checked against the image before any step runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from ._text import LORA_TARGETS, assemble, end_tokens, new_tokens
from .base import IGNORE_INDEX, Family, Layout, unwrap


class ChatFamily(Family):
    """A decoder-only family prompted through its processor's chat template."""

    trains_history = True  # a dialogue is one sequence: every reply trained in place
    question_template = "{question}"  # a chat model reads the question as the user's words
    caption_prompt = "Describe this image."
    image_token: str  # the placeholder the template writes, which the processor expands
    end_of_turn: str  # the token that ends a reply in the template (trained; generation stops there)

    def __init__(self, config: Any):
        super().__init__(config)
        # the id the model fills with image features (transformers names it either way, by family)
        found = getattr(config, "image_token_id", None)
        self.image_token_id: int = found if found is not None else config.image_token_index
        self.end_of_turn_id: int | None = None  # known once a processor is seen (`bind`): configs lack it

    def bind(self, processor: Any) -> None:
        """Learn the end-of-turn id from the tokenizer: what replies are trained to end with and generation
        stops at, with the language model's own end-of-sequence ids."""
        if self.end_of_turn_id is not None:
            return
        tok = processor.tokenizer
        found = tok.convert_tokens_to_ids(self.end_of_turn)
        if found is None or found == tok.unk_token_id:
            raise ValueError(f"the tokenizer has no {self.end_of_turn!r} token: not a {self.name} tokenizer")
        self.end_of_turn_id = int(found)
        self.end_token_ids = frozenset({self.end_of_turn_id, *end_tokens(self.config.get_text_config())})
        try:
            self._check_pieces(processor)
        except Exception:
            self.end_of_turn_id = None  # unbound again: every later call checks (and refuses) anew
            raise

    def _check_pieces(self, processor: Any) -> None:
        """Once per processor: the ids laid out piece by piece are the processor's own for the whole rendered
        dialogue. A tokenizer that tokenises a piece differently alone (one that marks the start of every text,
        as SentencePiece's prefix space does) is refused here, before it could train on a wrong layout."""
        image, history, turn = (
            Image.new("RGB", (64, 64)),
            [("What is this?", "a ball")],
            ("Where?", "on the left"),
        )
        layout = Layout(10_000, "right", [tuple(history)], True)
        mine = self.encode_batch(processor, [image], [turn[0]], [turn[1]], layout)["input_ids"][0].tolist()
        rendered = processor.apply_chat_template(self.messages([*history, turn]), tokenize=False)
        special = self._adds_specials(processor, rendered)
        whole = list(processor(images=[image], text=[rendered], add_special_tokens=special)["input_ids"][0])
        if whole[: len(mine)] != mine:
            at = next((k for k, (a, b) in enumerate(zip(mine, whole, strict=False)) if a != b), len(whole))
            tok = processor.tokenizer
            raise ValueError(
                f"{self.name}: the chat template's pieces tokenise differently alone than in the whole dialogue "
                f"(from token {at}: {tok.convert_ids_to_tokens(mine[at : at + 3])} against "
                f"{tok.convert_ids_to_tokens(whole[at : at + 3])}); this tokenizer needs another layout"
            )

    @staticmethod
    def _adds_specials(processor: Any, text: str) -> bool:
        """Whether the tokenizer should add its special tokens to `text`: not where the template wrote them
        (Gemma's `<bos>`; added again, a doubled `<bos>`)."""
        bos = processor.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    @property
    def end_token_id(self) -> int:
        if self.end_of_turn_id is None:
            raise RuntimeError(f"{self.name}: the end-of-turn id is read from the processor; encode first")
        return self.end_of_turn_id

    # --- rendering ----------------------------------------------------------------------------------------

    def messages(self, turns: Sequence[tuple[str, str | None]]) -> list[dict[str, Any]]:
        """HF chat messages for (prompt, reply) turns; the image goes with the first user turn."""
        out: list[dict[str, Any]] = []
        for k, (prompt, reply) in enumerate(turns):
            parts: list[dict[str, Any]] = [{"type": "image"}] if k == 0 else []
            if prompt:
                parts.append({"type": "text", "text": prompt})
            out.append({"role": "user", "content": parts})
            if reply is not None:
                out.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
        return out

    def pieces(
        self, processor: Any, history: Sequence[tuple[str, str]], prompt: str, target: str | None
    ) -> list[tuple[str, str]]:
        """The rendered conversation cut into (kind, text) pieces: "context" (never trained), "reply" (an
        earlier reply with its end of turn), "target" (the last reply, without its end of turn)."""

        def render(turns: Sequence[tuple[str, str | None]], prompt_next: bool) -> str:
            messages = self.messages(turns)
            return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt_next)

        turns: list[tuple[str, str | None]] = [*history, (prompt, target)]
        out: list[tuple[str, str]] = []
        done = ""
        for k, (asked, reply) in enumerate(turns):
            head = render([*turns[:k], (asked, None)], True)
            out.append(("context", self._after(done, head)))
            if reply is None:
                break
            whole = render(turns[: k + 1], False)
            said = self._after(head, whole)
            cut = said.find(self.end_of_turn)
            if cut < 0:
                raise ValueError(f"the chat template ends no reply with {self.end_of_turn!r}")
            last = k == len(turns) - 1
            out.append(("target", said[:cut]) if last else ("reply", said[: cut + len(self.end_of_turn)]))
            if not last:
                out.append(("context", said[cut + len(self.end_of_turn) :]))
            done = whole
        return out

    @staticmethod
    def _after(before: str, text: str) -> str:
        if not text.startswith(before):  # a template that rewrites earlier turns (none of vlmtune's do)
            raise ValueError(
                "the chat template renders a conversation's earlier turns differently as it grows"
            )
        return text[len(before) :]

    # --- inputs -------------------------------------------------------------------------------------------

    def encode_batch(
        self,
        processor: Any,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        targets: Any,
        layout: Layout,
    ) -> dict[str, torch.Tensor]:
        """`input_ids`, `attention_mask` (and `labels`) laid out by the chat template, plus the processor's
        image inputs; a reply is trained with its end of turn, every other position is IGNORE_INDEX."""
        self.bind(processor)
        tok = processor.tokenizer
        rows, row_labels, target_ids, image_tokens = [], [], [], []
        image_inputs: dict[str, list[torch.Tensor]] = {}
        for k, image in enumerate(images):
            target = targets[k] if targets is not None else None
            pieces = self.pieces(processor, layout.history[k], prompts[k], target)
            # The first piece holds the image placeholder: the processor expands it, from this image.
            text = pieces[0][1]
            special = self._adds_specials(processor, text)
            first = processor(images=[image], text=[text], return_tensors="pt", add_special_tokens=special)
            ids = first["input_ids"][0].tolist()
            labels = [IGNORE_INDEX] * len(ids)
            for name in processor.image_processor.model_input_names:  # pixels, and grids or masks
                if name in first:
                    image_inputs.setdefault(name, []).append(first[name])
            for kind, text in pieces[1:]:
                piece = tok(text, add_special_tokens=False)["input_ids"]
                if kind == "target":
                    target_ids.append(piece)
                    continue
                ids += piece
                trained = kind == "reply" and layout.train_history
                labels += piece if trained else [IGNORE_INDEX] * len(piece)
            image_tokens.append(self.check_image_tokens(ids, first))
            rows.append(ids)
            row_labels.append(labels)
        batch = assemble(
            rows,
            target_ids if targets is not None else None,
            encoder_decoder=False,
            end_id=self.end_token_id,
            pad_id=tok.pad_token_id,
            max_length=layout.max_length,
            image_tokens=image_tokens,
            padding_side=layout.padding_side,
            prompt_labels=row_labels,
        )
        batch.update({name: torch.cat(values) for name, values in image_inputs.items()})
        batch.update(self.token_inputs(batch["input_ids"]))
        return batch

    def token_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token inputs the model takes beside the ids, computed from them (padding included)."""
        return {}

    def check_image_tokens(self, ids: list[int], image_inputs: dict[str, Any]) -> int:
        """The image tokens in `ids`, checked against what the image gives (`image_token_count`)."""
        found = sum(1 for i in ids if i == self.image_token_id)
        want = self.image_token_count(image_inputs)
        if found != want:
            raise ValueError(
                f"the text holds {found} image tokens but the image gives {want}: the processor and the "
                "model's config disagree (a processor from another checkpoint?)"
            )
        return found

    def image_token_count(self, image_inputs: dict[str, Any]) -> int:
        """How many image tokens the model fills from one processed image."""
        raise NotImplementedError

    def count_tokens(
        self, processor: Any, prompt: str, target: str, history: tuple[tuple[str, str], ...]
    ) -> int:
        self.bind(processor)
        tok = processor.tokenizer
        pieces = self.pieces(processor, history, prompt, target)
        rest = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for _, t in pieces[1:])
        return self._context_tokens(processor, pieces[0][1]) + rest + 1  # + the target's end of turn

    def _context_tokens(self, processor: Any, text: str) -> int:
        """Text tokens of the first piece as `encode_batch` lays it out: through the processor, which may
        write text around each image (Gemma's blank lines and end-of-image marker), image tokens left out.
        Any image gives the same count of them, so one blank image stands in; kept per text."""
        cache = self.__dict__.setdefault("_context_cache", {})
        if text not in cache:
            blank = Image.new("RGB", (64, 64))
            special = self._adds_specials(processor, text)
            ids = processor(images=[blank], text=[text], add_special_tokens=special)["input_ids"][0]
            cache[text] = sum(1 for i in ids if i != self.image_token_id)
        return cache[text]

    def language_model(self, model: Any) -> Any:
        return unwrap(model).model.language_model

    def lora_target_modules(self) -> str:
        # every chat family's language model has LLaMA's projections, under `language_model`
        return LORA_TARGETS["llama"]

    def frozen_modules(self, groups: Sequence[str]) -> list[str]:
        """The modules of every group that does not train."""
        return [m for g in self.groups if g not in groups for m in self.group_modules(g)]

    def decode(self, processor: Any, tokens: Sequence[int] | torch.Tensor) -> str:
        self.bind(processor)
        return super().decode(processor, tokens)

    # --- generation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_tokens(
        self, model: Any, processor: Any, batch: dict[str, torch.Tensor], **kwargs: Any
    ) -> torch.Tensor:
        self.bind(processor)
        kwargs.setdefault("eos_token_id", sorted(self.end_token_ids))
        kwargs.setdefault("pad_token_id", processor.tokenizer.pad_token_id)
        out = model.generate(**batch, **kwargs)
        return new_tokens(out, batch, False)
