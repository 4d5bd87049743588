"""(image, prompt, target) examples from a split: one per caption or answer, images decoded lazily."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .batching import EpochSampler
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

    def __call__(self, row: dict[str, Any]) -> str:
        if self.question_column is None:
            return self.prompt
        return self.template.format(question=str(row[self.question_column]).strip())


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
        return {"image": image, "prompt": self.prompting(row), "target": text, "index": i}

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

    def without_images(self) -> TextOnlyExamples:
        """The same examples, in the same order, with no image decoded (for cached image features)."""
        column = self.prompting.question_column
        prompts = (
            [self.prompting({column: q}) for q in column_values(self.dataset, column)]
            if column
            else [self.prompting.prompt] * len(self.dataset)
        )
        return TextOnlyExamples([(i, prompts[i], t) for i, t in self.pairs])


@dataclass
class TextOnlyExamples:
    """(index, prompt, target) without decoding any image: for training on cached image features."""

    items: list[tuple[int, str, str]]  # (row, prompt, target)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, prompt, text = self.items[k]
        return {"prompt": prompt, "target": checked_target(text, f"row {i}"), "index": i}
