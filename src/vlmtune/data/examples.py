"""Examples from a split, images decoded lazily: (image, prompt, target) for captions and answers, one per
target; and the same with the earlier exchanges of a conversation as `history` ((prompt, reply) pairs,
rendered through the family's template), so a caption is a conversation of one exchange."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .batching import EpochSampler
from .conversations import Conversation, parse
from .images import as_image
from .sources import column_values


def target_problem(text: Any) -> str | None:
    """What is wrong with `text` as a training target (None: nothing): the one rule every path applies."""
    if not isinstance(text, str) or not text.strip():
        return f"expected a non-empty caption, got {text!r}"
    return None


def checked_target(text: Any, where: str) -> str:
    """`text`, or a DataError naming `where` it came from and what is wrong with it."""
    problem = target_problem(text)
    if problem is not None:
        raise DataError(f"{where}: {problem}")
    return text


def targets_of(value: Any) -> list[str]:
    """A text cell as its list of targets: one caption, or several (COCO, VQA answers)."""
    return [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class Prompting:
    """Where each example's prompt comes from: a fixed --prompt, or a question column through the template."""

    prompt: str = ""
    question_column: str | None = None
    template: str = "Question: {question} Answer:"

    @classmethod
    def of(cls, cfg: Any, family: Any) -> Prompting:
        """How a config's prompts are made: the family's caption prompt (or --prompt) and question template."""
        prompt = getattr(cfg, "prompt", None)
        prompt = family.caption_prompt if prompt is None else prompt
        return cls(prompt, getattr(cfg, "question_column", None), family.question_template)

    def __call__(self, row: dict[str, Any]) -> str:
        if self.question_column is None:
            return self.prompt
        return self.render(str(row[self.question_column]))

    def render(self, user: str, system: str = "") -> str:
        """A user turn as the model reads it: a question through the template, no text as the caption
        prompt; a system turn goes before it."""
        user = user.strip()
        prompt = self.template.format(question=user) if user else self.prompt
        return f"{system.strip()} {prompt}".strip() if system.strip() else prompt

    def dialogues(self, conversation: Conversation, *, per_turn: bool) -> list[Dialogue]:
        """The examples of a conversation: one whose target is the last reply and whose history holds every
        earlier exchange (a family that trains the history's replies in the same sequence); or, `per_turn`,
        one for each reply, with the exchanges before it as history."""
        rendered, held = self.exchanges(conversation), conversation.image_counts()
        ends = range(len(rendered)) if per_turn else [len(rendered) - 1]
        return [Dialogue(*rendered[k], tuple(rendered[:k]), held[: k + 1]) for k in ends]

    def reply_to(self, conversation: Conversation) -> Dialogue:
        """What to generate from for a conversation that ends with a user turn: its earlier exchanges as
        history, rendered exactly as training renders them, and the last user turn as the prompt."""
        *done, last = conversation.turns
        history = tuple(self.exchanges(Conversation(tuple(done), conversation.images)))
        prompt = self.render(last.text, "" if history else conversation.system)
        return Dialogue(prompt, "", history, conversation.image_counts())

    def exchanges(self, conversation: Conversation) -> list[tuple[str, str]]:
        """(prompt, reply) of each exchange, the system turn before the first prompt."""
        return [
            (self.render(user, conversation.system if k == 0 else ""), reply)
            for k, (user, reply) in enumerate(conversation.exchanges())
        ]


@dataclass(frozen=True)
class Dialogue:
    """What the family encodes: the history's exchanges, then the prompt and its target; `turn_images`: how
    many of the example's images each user turn holds (the history's, then the prompt's)."""

    prompt: str
    target: str
    history: tuple[tuple[str, str], ...] = ()
    turn_images: tuple[int, ...] = (1,)

    def example(self, images: list[Any], index: int) -> dict[str, Any]:
        """The example a collator takes: the images its turns hold, and where they go."""
        return {
            "images": images,
            "prompt": self.prompt,
            "target": self.target,
            "history": self.history,
            "turn_images": self.turn_images,
            "index": index,
        }


class CaptionExamples:
    """(image, prompt, target) examples from a `datasets.Dataset`, images decoded lazily.

    A row with several targets (COCO's captions, VQA's answers) gives one example per target; `per_image`
    gives one example per row instead (the first target), for work done once per image.
    """

    def __init__(
        self,
        dataset: Any,
        image_column: str = "image",
        text_column: str = "text",
        prompting: Prompting | None = None,
        per_image: bool = False,
    ):
        self.dataset, self.image_column, self.text_column = dataset, image_column, text_column
        self.prompting = prompting or Prompting()
        texts = column_values(dataset, text_column)
        self.pairs = (
            [(i, targets_of(t)[0]) for i, t in enumerate(texts)]
            if per_image
            else [(i, t) for i, value in enumerate(texts) for t in targets_of(value)]
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, text = self.pairs[k]
        row = self.dataset[i]
        image = as_image(row[self.image_column], f"row {i}, column {self.image_column!r}")
        text = checked_target(text, f"row {i}, column {self.text_column!r}")
        return Dialogue(self.prompting(row), text).example([image], i)

    def epoch_order(self, seed: int, batch_size: int, *, one_caption: bool, by_length: bool) -> EpochSampler:
        """The sampler of each epoch's order (one caption per image, batches of similar length, as asked)."""
        return EpochSampler(
            len(self),
            seed,
            groups=self.groups() if one_caption else None,
            lengths=self.target_lengths() if by_length else None,
            batch_size=batch_size,
        )

    def workers(self, asked: int) -> int:
        """DataLoader workers that get a share: all of them, for a map-style split."""
        return asked

    def head(self, n: int) -> list[dict[str, Any]]:
        """The first `n` examples: fixed samples to caption during training."""
        return [self[i] for i in range(min(n, len(self)))]

    def groups(self) -> list[list[int]]:
        """Example indices by image (row), for drawing one caption per image."""
        by_row: dict[int, list[int]] = {}
        for k, (i, _) in enumerate(self.pairs):
            by_row.setdefault(i, []).append(k)
        return list(by_row.values())

    def target_lengths(self) -> list[int]:
        """Each example's target length in characters: a cheap stand-in for tokens, for grouping by length."""
        return [len(t) if isinstance(t, str) else 0 for _, t in self.pairs]

    def without_images(self, sizes: list | None = None) -> TextOnlyExamples:
        """The same examples, in the same order, with no image decoded (for cached image features); `sizes`:
        each row's images' (width, height), which their tokens may follow."""
        column = self.prompting.question_column
        prompts = (
            [self.prompting({column: q}) for q in column_values(self.dataset, column)]
            if column
            else [self.prompting.prompt] * len(self.dataset)
        )
        return TextOnlyExamples([(i, Dialogue(prompts[i], t)) for i, t in self.pairs], sizes)


@dataclass
class TextOnlyExamples:
    """(row, dialogue) examples without decoding any image: for training on cached image features, with each
    row's image sizes where they are known (the text's layout may follow them)."""

    items: list[tuple[int, Dialogue]]
    sizes: list | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, d = self.items[k]
        checked_target(d.target, f"row {i}")
        return {**d.example([], i), "image_sizes": self.sizes[i] if self.sizes else None}


class ConversationExamples(CaptionExamples):
    """A conversation split's examples (the `messages` and `images` columns of any conversation layout), each
    with its image, its history and the reply to train. The records are parsed once, text only; a
    family that cannot train earlier replies in the same sequence (`per_turn`) gets an example per reply."""

    def __init__(
        self,
        dataset: Any,
        messages_column: str = "messages",
        images_column: str = "images",
        prompting: Prompting | None = None,
        per_image: bool = False,
        per_turn: bool = False,
    ):
        self.dataset, self.image_column, self.text_column = dataset, images_column, messages_column
        self.prompting = prompting or Prompting()
        self.conversations = [
            parse(m, [None] * n)
            for m, n in zip(column_values(dataset, messages_column), self._counts(), strict=True)
        ]
        self.pairs = [
            (i, d)
            for i, c in enumerate(self.conversations)
            for d in self.prompting.dialogues(c, per_turn=per_turn)[: 1 if per_image else None]
        ]

    def _counts(self) -> list[int]:
        """How many images each record gives beside its messages (none where the column is missing)."""
        if self.image_column not in (self.dataset.column_names or []):
            return [0] * len(self.dataset)
        from .checks import raw_images

        return [
            0 if v is None else 1 if isinstance(v, (str, dict)) else len(v)
            for v in column_values(raw_images(self.dataset, self.image_column), self.image_column)
        ]

    def image_cells(self, i: int) -> list[Any]:
        """Row `i`'s images, in turn order: from its messages' parts, or the images column."""
        cells = self.conversations[i].images
        if cells and cells[0] is not None:
            return list(cells)
        value = self.dataset[i][self.image_column]
        return [value] if isinstance(value, (str, dict)) else list(value or [])

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, d = self.pairs[k]
        # the images of the example's own turns: a reply is trained (or generated) before any later one shows
        cells = self.image_cells(i)[: sum(d.turn_images)]
        if not cells:
            raise DataError(
                f"row {i}: the reply of turn {len(d.history) + 1} comes before the conversation's first image; "
                "put an image in the first user turn"
            )
        where = f"row {i}, column {self.image_column!r}"
        images = [
            as_image(c, f"{where}, image {n + 1}" if len(cells) > 1 else where) for n, c in enumerate(cells)
        ]
        return d.example(images, i)

    def target_lengths(self) -> list[int]:
        return [len(d.target) + sum(len(a) for _, a in d.history) for _, d in self.pairs]

    def without_images(self, sizes: list | None = None) -> TextOnlyExamples:
        return TextOnlyExamples(list(self.pairs), sizes)
