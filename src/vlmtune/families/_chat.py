"""Families whose instruct checkpoints read a conversation through their processor's chat template (Qwen-VL,
and the chat families after it). The template is the authority: vlmtune renders with it, never by hand.

How an example becomes tokens and labels, with nothing but the template:

    head_1 = render([user_1], add_generation_prompt=True)      system, user turn, image, "assistant" header
    whole_1 = render([user_1, assistant_1])                     ... + reply_1 + end of turn (+ what follows it)
    head_2 = render([user_1, assistant_1, user_2], True)        ...

Each reply is the text `whole_k` adds to `head_k`, up to and including the end-of-turn token (a template
that writes none, LLaVA-1.5's, gets the tokenizer's end-of-sequence appended to each reply); everything else
(system, user turns, images, the assistant headers, what follows an end of turn) is never trained. A user turn
opens with the image placeholders of the images it holds (several images, in several turns, where the record
has them). The pieces joined are the whole rendered text, tokenised once, as a whole (a SentencePiece
tokenizer marks the start of every text it is given: pieces tokenised apart would not be the ids of the
whole), and each token takes the kind of the piece its characters come from; a token that spans a reply and
its context is refused.

The processor tokenises the same text with each image placeholder expanded into as many tokens as its image
gives (and, in some families, markers and blank lines around them, which may join the text beside them). The
processor's ids are the model's; each takes its kind from the tokenizer's own ids by aligning the two, and
every reply token must be found, in order and unbroken, among the processor's: else the record is refused.
What the expansion adds is the images' and never counts against --max-length, which counts the text the
template renders (placeholders left out), so it can be counted without an image. The count of image tokens
is checked against the images, before any step runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from difflib import SequenceMatcher
from typing import Any

import torch
from PIL import Image

from ._text import assemble, end_tokens
from ._vlm import TransformersVLM
from .base import IGNORE_INDEX, Layout, require_image_tokens


class ChatFamily(TransformersVLM):
    """A decoder-only family prompted through its processor's chat template."""

    trains_history = True  # a dialogue is one sequence: every reply trained in place
    max_images = None  # any number, each where its user turn is
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
        """Learn from the tokenizer and template what configs lack: the end-of-turn id (what replies are
        trained to end with and generation stops at, with the language model's own end-of-sequence ids) and
        whether the template writes it after a reply or vlmtune must."""
        if self.end_of_turn_id is not None:
            return
        tok = processor.tokenizer
        found = tok.convert_tokens_to_ids(self.end_of_turn)
        if found is None or found == tok.unk_token_id:
            raise ValueError(f"the tokenizer has no {self.end_of_turn!r} token: not a {self.name} tokenizer")
        probe = [{"role": "user", "content": [{"type": "text", "text": "?"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]  # fmt: skip
        said = processor.apply_chat_template(probe, tokenize=False).rsplit("x", 1)[-1]
        self.appends_end = self.end_of_turn not in said
        self.end_of_turn_id = int(found)
        self.end_token_ids = frozenset({self.end_of_turn_id, *end_tokens(self.config.get_text_config())})

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

    appends_end = False  # the template writes no end of turn after a reply (`bind` finds out): vlmtune does

    def messages(
        self, turns: Sequence[tuple[str, str | None]], turn_images: Sequence[int] = (1,)
    ) -> list[dict[str, Any]]:
        """HF chat messages for (prompt, reply) turns; user turn k opens with `turn_images[k]` images (by
        default one image, in the first)."""
        out: list[dict[str, Any]] = []
        for k, (prompt, reply) in enumerate(turns):
            held = turn_images[k] if k < len(turn_images) else 0
            parts: list[dict[str, Any]] = [{"type": "image"} for _ in range(held)]
            if prompt:
                parts.append({"type": "text", "text": prompt})
            out.append({"role": "user", "content": parts})
            if reply is not None:
                reply = reply + self.end_of_turn if self.appends_end else reply
                out.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
        return out

    def pieces(
        self,
        processor: Any,
        history: Sequence[tuple[str, str]],
        prompt: str,
        target: str | None,
        turn_images: Sequence[int] = (1,),
    ) -> list[tuple[str, str]]:
        """The rendered conversation cut into (kind, text) pieces: "context" (never trained), "reply" (an
        earlier reply with its end of turn), "target" (the last reply, without its end of turn)."""
        self.bind(processor)

        def render(turns: Sequence[tuple[str, str | None]], prompt_next: bool) -> str:
            messages = self.messages(turns, turn_images)
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
        images: list[list[Image.Image]],
        prompts: Sequence[str],
        targets: Any,
        layout: Layout,
    ) -> dict[str, torch.Tensor]:
        """`input_ids`, `attention_mask` (and `labels`) laid out by the chat template, plus the processor's
        image inputs; a reply is trained with its end of turn, every other position is IGNORE_INDEX."""
        rows, row_labels, target_ids, expanded = [], [], [], []
        image_inputs: dict[str, list[torch.Tensor]] = {}
        for k, held in enumerate(images):
            target = targets[k] if targets is not None else None
            pieces = self.pieces(processor, layout.history[k], prompts[k], target, layout.turn_images[k])
            ids, kinds, processed, added = self._tokenise(processor, held, pieces)
            for name in processor.image_processor.model_input_names:  # pixels, and grids or masks
                if name in processed:
                    image_inputs.setdefault(name, []).append(processed[name])
            self.check_image_tokens(ids, processed)
            expanded.append(added)
            told = sum(1 for kind in kinds if kind == "target")
            if set(kinds[len(kinds) - told :]) - {"target"}:  # a tokenizer that writes text after it
                raise ValueError(f"{self.name}: the tokenizer adds tokens after the reply")
            rows.append(ids[: len(ids) - told])
            target_ids.append(ids[len(ids) - told :])
            trained = ("reply",) if layout.train_history else ()
            row_labels.append(
                [t if kind in trained else IGNORE_INDEX for t, kind in zip(rows[-1], kinds, strict=False)]
            )
        batch = assemble(
            rows,
            target_ids if targets is not None else None,
            encoder_decoder=False,
            end_id=self.end_token_id,
            pad_id=processor.tokenizer.pad_token_id,
            max_length=layout.max_length,
            image_tokens=expanded,
            padding_side=layout.padding_side,
            prompt_labels=row_labels,
        )
        batch.update({name: self.collate_images(name, values) for name, values in image_inputs.items()})
        batch.update(self.token_inputs(batch["input_ids"]))
        return batch

    def _tokenise(
        self, processor: Any, images: list[Image.Image], pieces: list[tuple[str, str]]
    ) -> tuple[list[int], list[str], dict[str, Any], int]:
        """(ids, each id's kind, the processor's output, how many ids the image expansion added) for one
        rendered conversation: the processor's ids (placeholders expanded), each token the kind of the piece
        its characters come from."""
        text = "".join(piece for _, piece in pieces)
        special = self._adds_specials(processor, text)
        processed = processor(images=[images], text=[text], return_tensors="pt", add_special_tokens=special)
        ids = processed["input_ids"][0].tolist()
        own = processor.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        # the kind of every character, then of every token of the tokenizer's own (unexpanded) ids
        of_char = [kind for kind, piece in pieces for _ in piece]
        kinds = []
        for start, end in own["offset_mapping"]:
            found = set(of_char[start:end]) or {"context"}  # a special token the tokenizer adds
            if len(found) > 1:
                tok = processor.tokenizer
                raise ValueError(
                    f"{self.name}: a token spans a reply and the text around it ({text[start:end]!r} in "
                    f"{tok.convert_ids_to_tokens(own['input_ids'][len(kinds)])!r}): the reply cannot be "
                    "trained apart from its prompt with this tokenizer"
                )
            kinds.append(found.pop())
        mine = own["input_ids"]
        added = len(ids) - self._text_length(processor, mine)  # all the images', never --max-length's
        return ids, self._aligned_kinds(ids, mine, kinds), processed, added

    def _aligned_kinds(self, ids: list[int], mine: list[int], kinds: list[str]) -> list[str]:
        """The kind of each of the processor's `ids`, from the tokenizer's own ids of the same text (`mine`,
        of `kinds`): the two agree but where the processor expanded an image placeholder (with whatever the
        expansion joined beside it), all context. Every reply token must be found among the processor's, in
        order and unbroken, or the record is refused."""
        out, where = ["context"] * len(ids), [-1] * len(mine)
        for a, b, size in SequenceMatcher(None, ids, mine, autojunk=False).get_matching_blocks():
            out[a : a + size] = kinds[b : b + size]
            where[b : b + size] = range(a, a + size)
        for b, kind in enumerate(kinds):
            unbroken = b == 0 or kinds[b - 1] != kind or where[b] == where[b - 1] + 1
            if kind != "context" and (where[b] < 0 or not unbroken):
                raise ValueError(
                    f"{self.name}: the processor tokenises this record's text differently from its tokenizer "
                    "where a reply is (a processor from another checkpoint?)"
                )
        return out

    #: processor outputs whose second dimension counts an image's views (tiles), which vary with the image:
    #: padded with zeros to the batch's most (the model drops all-zero views)
    padded_views: tuple[str, ...] = ()

    def collate_images(self, name: str, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """One batch input from each example's processor output `name` (pixels, grids, sizes)."""
        if name not in self.padded_views:
            return torch.cat(list(values))
        most = max(v.shape[1] for v in values)
        pad = torch.nn.functional.pad
        return torch.cat([pad(v, (0, 0) * (v.dim() - 2) + (0, most - v.shape[1])) for v in values])

    def token_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token inputs the model takes beside the ids, computed from them (padding included)."""
        return {}

    def check_image_tokens(self, ids: list[int], image_inputs: dict[str, Any]) -> int:
        """The image tokens in `ids`, checked against what the images give (`image_token_count`)."""
        return require_image_tokens(ids, self.image_token_id, self.image_token_count(image_inputs))

    def image_token_count(self, image_inputs: dict[str, Any]) -> int:
        """How many image tokens the model fills from one example's processed images."""
        raise NotImplementedError

    def count_tokens(
        self,
        processor: Any,
        prompt: str,
        target: str,
        history: tuple[tuple[str, str], ...],
        turn_images: tuple[int, ...] = (1,),
    ) -> int:
        pieces = self.pieces(processor, history, prompt, target, turn_images)
        text = "".join(piece for _, piece in pieces)
        own = processor.tokenizer(text, add_special_tokens=self._adds_specials(processor, text))["input_ids"]
        return self._text_length(processor, own) + 1  # + the target's end of turn

    def _text_length(self, processor: Any, own: list[int]) -> int:
        """What the tokenizer's own ids of a rendered text spend of --max-length: all but the placeholders.
        (`encode` and `count_tokens` both count this way, so `data check` agrees with training.)"""
        return len(own) - own.count(processor.tokenizer.convert_tokens_to_ids(self.image_token))

    def decode(self, processor: Any, tokens: Sequence[int] | torch.Tensor) -> str:
        self.bind(processor)
        return super().decode(processor, tokens)

    # --- generation -------------------------------------------------------------------------------------

    def generate_tokens(
        self, model: Any, processor: Any, batch: dict[str, torch.Tensor], **kwargs: Any
    ) -> torch.Tensor:
        self.bind(processor)  # the end-of-turn id, where generation stops
        return super().generate_tokens(model, processor, batch, **kwargs)
