"""What every model family tells vlmtune. One file per family implements it; nothing else knows its quirks.

The core (training, captioning, serving, evaluation) speaks only this interface: it never names a module, a
token or a prompt of its own. A family says where its language model is, which module groups can train next
to LoRA (and so what stays frozen and what part of the image path can be computed once), how a prompt looks,
how an example becomes model inputs with labels, which tokens end a target, and how it generates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

IGNORE_INDEX = -100  # label value that the cross-entropy loss skips
History = Sequence[Sequence[tuple[str, str]]] | None  # per example: earlier (prompt, reply) exchanges
# per example: its image, or its images in turn order
Images = Sequence["Image.Image | Sequence[Image.Image]"]
# per example: how many of its images each user turn holds (None: all of them in the first)
TurnImages = Sequence[Sequence[int] | None] | None


def trained_span(target_ids: list[int], end_id: int, room: int) -> list[int]:
    """The label ids of one target: its tokens then the end token, in at most `room` tokens.

    A target cut short by `room` gets no end token, so the model never learns to stop mid-sentence. Every
    family masks this way: these ids are trained, every other position of the example is IGNORE_INDEX.
    """
    if room < 1:
        raise ValueError(f"no room left for the target ({room} tokens); raise max_length")
    return target_ids + [end_id] if len(target_ids) < room else target_ids[:room]


def pad_rows(
    rows: list[list[int]], labels: list[list[int]] | None, pad_id: int, side: str
) -> dict[str, torch.Tensor]:
    """Token rows (and their labels) padded to one width: `input_ids`, `attention_mask` (and `labels`),
    (B, T) long. Padding is never trained (IGNORE_INDEX) and never attended to (mask 0)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
        if labels is not None:
            lab[i, span] = torch.tensor(labels[i], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        out["labels"] = lab
    return out


def require_image_tokens(ids: Sequence[int], image_token_id: int, want: int) -> int:
    """The image placeholders in one example's `ids`, which must be as many as its image gives the model
    (`want`): else the model would fail mid-step on "image features and image tokens do not match"."""
    found = sum(1 for i in ids if i == image_token_id)
    if found != want:
        raise ValueError(
            f"the text holds {found} image tokens but the image gives {want}: the processor and the model's "
            "config disagree (a processor from another checkpoint?)"
        )
    return found


def unwrap(model: Any) -> Any:
    """The transformers model under Accelerate's (DDP) and peft's wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def image_lists(images: Images) -> list[list[Image.Image]]:
    """Each example's images as a list (an example given one image reads that one)."""
    return [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]


def only_images(images: Sequence[Sequence[Image.Image]]) -> list[Image.Image]:
    """The one image of each example, for a family that reads one (`Family.encode` checked the counts)."""
    return [one for (one,) in images]


@dataclass(frozen=True)
class Layout:
    """How a batch's text is laid out beyond its prompts and targets (what `encode` hands `encode_batch`)."""

    max_length: int  # most text tokens per example; image tokens not counted
    padding_side: str  # "right" for training, "left" for batched generation
    history: list[tuple[tuple[str, str], ...]]  # per example: earlier (prompt, reply) exchanges, rendered
    train_history: bool  # the history's replies trained too
    turn_images: list[tuple[int, ...]]  # per example: how many of its images each user turn holds
    # per example: its images' (width, height), where the text is laid out without them (`encode_text`)
    image_sizes: Sequence[Sequence[tuple[int, int]]] | None = None


class Family(ABC):
    """A family of image-to-text models (BLIP-2, InstructBLIP, BLIP, ...)."""

    name: str
    #: hub checkpoints the family was written for (listed by `vlmtune models`)
    hub_ids: tuple[str, ...] = ()
    #: module groups that can train in full next to LoRA: name -> what it is (`--train-modules`)
    groups: dict[str, str] = {}
    #: how a question becomes a prompt; the one place each family writes it
    question_template: str = "Question: {question} Answer:"
    #: the prompt of plain captioning when the user gives none
    caption_prompt: str = ""
    #: for `vlmtune models` and the README: where LoRA goes by default, what the image cache holds, memory
    lora: str = ""
    cache: str = "none"
    memory: str = ""

    def __init__(self, config: Any):
        self.config = config  # the model's transformers config; a family instance serves one model
        self.end_token_ids: frozenset[int] = frozenset()  # tokens that end a target; generation stops there

    # --- what it is -------------------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def matches(cls, config: Any) -> bool:
        """Whether a transformers config belongs to this family."""

    @abstractmethod
    def lora_target_modules(self) -> str:
        """peft `target_modules` (a regex over module names) for the default LoRA placement."""

    @abstractmethod
    def language_model(self, model: Any) -> Any:
        """The language model inside `model` (for gradient checkpointing, compiling)."""

    @property
    def end_token_id(self) -> int:
        """The token a trained target ends with (the smallest of `end_token_ids`: a stable choice)."""
        return min(self.end_token_ids)

    # --- what trains ------------------------------------------------------------------------------------

    def group_modules(self, group: str) -> list[str]:
        """Module names trained in full for one of `groups` (peft `modules_to_save`)."""
        raise KeyError(group)

    def modules_to_save(self, groups: Sequence[str]) -> list[str]:
        return [m for g in groups for m in self.group_modules(g)]

    def frozen_modules(self, groups: Sequence[str]) -> list[str]:
        """Modules with no trainable weight when `groups` train: kept in eval mode (no dropout noise). By
        default the modules of every group that does not train."""
        return [m for g in self.groups if g not in groups for m in self.group_modules(g)]

    def cache_level(self, groups: Sequence[str], model: Any) -> tuple[str | None, str]:
        """(what part of the image path can be computed once per image, why), for the trainable `groups`:
        "projection" (all the language model receives for an image), "vision" (the vision encoder's output;
        the modules after it run each step), or None (no cache)."""
        return None, f"{self.name} takes no precomputed image features"

    # --- images -----------------------------------------------------------------------------------------

    dynamic_resolution = False  # whether images keep their own size (and give a varying number of tokens)
    # Most pixels an image keeps in training when --max-pixels is not given (`dynamic_resolution` families):
    # at a checkpoint's own limit one photo can give thousands of tokens and run the accelerator out of memory.
    default_max_pixels = 768 * 768

    def set_pixels(self, processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
        """Resize images to between `min_pixels` and `max_pixels` (families with `dynamic_resolution`)."""
        raise ValueError(f"{self.name} resizes every image to one size; --min/max-pixels do not apply")

    def pixel_limits(self, processor: Any) -> tuple[int, int]:
        """(fewest, most) pixels the processor resizes an image to (families with `dynamic_resolution`)."""
        raise ValueError(f"{self.name} resizes every image to one size")

    def limit_pixels(self, processor: Any, min_pixels: int | None, max_pixels: int | None) -> str | None:
        """--min/max-pixels on the processor, for training and what counts for it: without --max-pixels, a
        dynamic-resolution family's images keep at most `default_max_pixels` (unless the processor allows
        fewer, or --min-pixels asks more). Returns what was decided, for the log."""
        said = None
        if self.dynamic_resolution and max_pixels is None:
            fewest, most = self.pixel_limits(processor)
            cap = max(self.default_max_pixels, min_pixels or fewest)
            if most > cap:
                max_pixels = cap
                said = (
                    f"images resized to at most {cap} pixels (--max-pixels; the checkpoint's processor allows "
                    f"{most})"
                )
        if min_pixels or max_pixels:
            self.set_pixels(processor, min_pixels, max_pixels)
        return said

    def image_tokens(self, processor: Any, width: int, height: int) -> int | None:
        """How many tokens an image of this size gives the language model (None: the family does not vary)."""
        return None

    # --- prompts and inputs -----------------------------------------------------------------------------

    def format_question(self, question: str, template: str | None = None) -> str:
        return (template or self.question_template).format(question=question.strip())

    # Whether `encode_batch` reads a conversation's earlier exchanges as tokens of their own, their replies
    # trained in the same sequence as the last one. A family that does not (an encoder-decoder, whose decoder
    # holds one reply) reads the history folded into the prompt's text, and trains one example per reply.
    trains_history: bool = False
    #: most images one example reads (None: any number, each in the user turn that holds it); a record with
    #: more is refused
    max_images: int | None = 1

    def fold(self, history: Sequence[tuple[str, str]], prompt: str) -> str:
        """The earlier exchanges as text before `prompt`: "Question: q1 Answer: a1 Question: q2 Answer:"."""
        return " ".join([*(f"{p} {a.strip()}".strip() for p, a in history), prompt]).strip()

    def dialogue(
        self,
        prompts: Sequence[str],
        history: History,
        turn_images: TurnImages = None,
        counts: Sequence[int] | None = None,
    ) -> tuple[list[str], list[tuple[tuple[str, str], ...]], list[tuple[int, ...]]]:
        """(prompts, history, turn_images) as `encode_batch` takes them: the history folded into the prompts
        (and its images into the prompt's turn) unless the family `trains_history`; no history, an empty one
        per row; no `turn_images`, each example's images (`counts` of them, by default one) in its first turn."""
        history = [tuple(h) for h in history] if history is not None else [()] * len(prompts)
        counts = counts if counts is not None else [1] * len(prompts)
        given = turn_images if turn_images is not None else [None] * len(prompts)
        turn_images = [
            tuple(t) if t is not None else (n,) + (0,) * len(h)
            for t, n, h in zip(given, counts, history, strict=True)
        ]
        if self.trains_history:
            return list(prompts), history, turn_images
        folded = [self.fold(h, p) if h else p for h, p in zip(history, prompts, strict=True)]
        return folded, [()] * len(prompts), [(sum(t),) for t in turn_images]

    def check_images(self, images: list[list[Image.Image]], layout: Layout) -> list[list[Image.Image]]:
        """Each example's images, as many as the family reads and as its turns hold."""
        for k, (held, turns) in enumerate(zip(images, layout.turn_images, strict=True)):
            if not held or (self.max_images is not None and len(held) > self.max_images):
                most = f"at most {self.max_images}" if self.max_images else "at least one"
                raise ValueError(f"example {k}: {len(held)} images; {self.name} reads {most} per example")
            if len(turns) != len(layout.history[k]) + 1 or sum(turns) != len(held):
                raise ValueError(
                    f"example {k}: its turns hold {sum(turns)} images in {len(turns)} turns, but it has "
                    f"{len(held)} images and {len(layout.history[k]) + 1} turns"
                )
        return images

    def encode(
        self,
        processor: Any,
        images: Images,
        prompts: Sequence[str],
        targets: Sequence[str] | None,
        *,
        max_length: int,
        padding_side: str,
        history: History = None,
        train_history: bool = True,
        turn_images: TurnImages = None,
    ) -> dict[str, torch.Tensor]:
        """Model inputs for a batch; with `targets`, also `labels`: the target tokens and the end token
        trained (`trained_span`), and with `train_history` each earlier reply of the history the same way,
        every other position (image, prompts, system, padding) IGNORE_INDEX.

        Args:
            images: per example, an RGB image, or a list of them (families with `max_images` over one).
            prompts: text before the target ("" for plain captioning, a question for VQA).
            targets: what the model should learn to say, or None at generation time.
            max_length: most text tokens per example (history, prompt, target, end); image tokens not counted.
            padding_side: "right" for training, "left" for batched generation.
            history: per example, the conversation's earlier (prompt, reply) exchanges, rendered.
            turn_images: per example, how many of its images each user turn holds (the history's, then the
                prompt's); by default all of them in the first.
        """
        images = image_lists(images)
        prompts, layout = self.layout(
            prompts, max_length, padding_side, history, train_history, turn_images, [len(x) for x in images]
        )
        return self.encode_batch(processor, self.check_images(images, layout), prompts, targets, layout)

    def layout(
        self,
        prompts: Sequence[str],
        max_length: int,
        padding_side: str,
        history: History,
        train_history: bool,
        turn_images: TurnImages,
        counts: Sequence[int] | None = None,
        image_sizes: Sequence[Sequence[tuple[int, int]]] | None = None,
    ) -> tuple[list[str], Layout]:
        """(prompts, layout) as `encode_batch` takes them, through `dialogue`."""
        prompts, history, turn_images = self.dialogue(prompts, history, turn_images, counts)
        return prompts, Layout(max_length, padding_side, history, train_history, turn_images, image_sizes)

    @abstractmethod
    def encode_batch(
        self,
        processor: Any,
        images: list[list[Image.Image]],
        prompts: Sequence[str],
        targets: Any,
        layout: Layout,
    ) -> dict[str, torch.Tensor]:
        """`encode` for the family, the history as `dialogue` gives it (always empty unless `trains_history`);
        `images` holds each example's images (one, unless `max_images` allows more: `only_images`)."""

    def text_tokens(
        self,
        processor: Any,
        prompt: str,
        target: str,
        history: Sequence[tuple[str, str]] = (),
        turn_images: Sequence[int] | None = None,
    ) -> int:
        """How many of `--max-length`'s tokens the example's text spends, counted as `encode` counts them
        (history, special tokens and the end token included, image tokens not): over max_length, the target
        is cut. (A prompt that alone is over max_length is refused by `encode`.)"""
        turns = None if turn_images is None else [turn_images]
        prompts, histories, turns = self.dialogue([prompt], [history], turns)
        return self.count_tokens(processor, prompts[0], target, histories[0], turns[0])

    @abstractmethod
    def count_tokens(
        self,
        processor: Any,
        prompt: str,
        target: str,
        history: tuple[tuple[str, str], ...],
        turn_images: tuple[int, ...],
    ) -> int:
        """`text_tokens` for the family, the history as `dialogue` gives it."""

    def encode_text(
        self,
        processor: Any,
        prompts: Sequence[str],
        targets: Sequence[str],
        *,
        max_length: int,
        padding_side: str,
        history: History = None,
        train_history: bool = True,
        turn_images: TurnImages = None,
        image_sizes: Sequence[Sequence[tuple[int, int]]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """`encode` without the images (the same ids and labels), for training on cached image features;
        `image_sizes`: each example's images' (width, height), where the tokens an image gives follow its size."""
        counts = None if image_sizes is None else [len(s) for s in image_sizes]
        prompts, layout = self.layout(
            prompts, max_length, padding_side, history, train_history, turn_images, counts, image_sizes
        )
        return self.encode_text_batch(processor, prompts, targets, layout)

    def encode_text_batch(
        self, processor: Any, prompts: Sequence[str], targets: Sequence[str], layout: Layout
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{self.name} has no image-feature cache")

    def generation_inputs(
        self,
        processor: Any,
        images: Images,
        prompts: Sequence[str],
        device: torch.device,
        dtype: torch.dtype,
        max_length: int = 512,
        history: History = None,
        turn_images: TurnImages = None,
    ) -> dict[str, torch.Tensor]:
        """`encode` without targets, as `generate` takes it: left-padded, on `device`, images in `dtype`; a
        conversation's `history` (and the images its turns hold) laid out exactly as training laid it out."""
        batch = self.encode(
            processor,
            images,
            prompts,
            None,
            max_length=max_length,
            padding_side="left",
            history=history,
            turn_images=turn_images,
        )
        return to_model(batch, device, dtype)

    def image_features(
        self, model: Any, batch: dict[str, Any], upto: str = "projection"
    ) -> torch.Tensor | list[torch.Tensor]:
        """What the frozen part of the image path hands on for each example of `batch` (`encode`'s output, on
        the model's device; see `cache_level`): a (B, ...) tensor, or a list of B tensors (n_i, ...) when
        examples give a varying number of feature tokens; the cache stores either, and `cached_inputs` gets
        back what this returned."""
        raise NotImplementedError(f"{self.name} has no image-feature cache")

    def cached_inputs(
        self, features: torch.Tensor, model: Any = None, upto: str = "projection", batch: Any = None
    ) -> dict[str, Any]:
        """forward() arguments that make the model use `features` (from `image_features(..., upto)`) instead
        of computing them; for "vision" features the trainable modules after the vision encoder run here, on
        `model`, with gradients (reading `batch` where they need its text). May pop keys from `batch`."""
        raise NotImplementedError(f"{self.name} has no image-feature cache")

    #: the per-example inputs of a family whose examples can be packed into rows (`--packing`: a decoder-only
    #: language model that takes positions and a 4D attention mask, images filled in reading order); None: not
    packable: tuple[str, ...] | None = None

    def loss_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` as the training forward should take it; a family may trim work the loss never reads."""
        return batch

    def own_loss(self) -> str | None:
        """Why the model scores its training loss itself, where it does: `--loss-chunk` replaces the
        `loss_function` that transformers' models call with the output layer's logits, and cannot chunk a loss
        computed inside the model. None: the model calls `loss_function`."""
        return None

    def logit_softcap(self, config: Any) -> float | None:
        """The cap the model's forward applies to its logits (`cap * tanh(logits / cap)`) before the loss, if
        any, read from its text config's `final_logit_softcapping`: `--loss-chunk` applies the output layer
        itself, and so the cap too, and sets that attribute aside meanwhile."""
        return None

    # --- generation -------------------------------------------------------------------------------------

    def vllm_prompt_ids(
        self,
        processor: Any,
        prompts: Sequence[str],
        history: History = None,
        turn_images: TurnImages = None,
        max_length: int = 512,
    ) -> list[list[int]]:
        """Each prompt's ids as vLLM's processor for the family takes them, the image tokens left for it to
        insert (`--engine vllm`): the ids `generation_inputs` lays out, token for token."""
        raise NotImplementedError(f"--engine vllm: {self.name} is not fed to vLLM yet (BLIP-2 with OPT is)")

    encoder_decoder = False  # whether the language model is an encoder-decoder (T5): what `generate` returns

    @torch.no_grad()
    def generate_tokens(
        self, model: Any, processor: Any, batch: dict[str, torch.Tensor], **kwargs: Any
    ) -> torch.Tensor:
        """The new tokens for `batch` (B, T_new), prompt stripped; rows that stopped early end in padding.
        Keyword arguments go to transformers' `generate` (streamer, stopping criteria, sampling...); by
        default the model's own `generate`, stopping at `end_token_ids`."""
        kwargs.setdefault("eos_token_id", sorted(self.end_token_ids))
        kwargs.setdefault("pad_token_id", processor.tokenizer.pad_token_id)
        out = model.generate(**batch, **kwargs)
        # a decoder-only model returns the prompt too; an encoder-decoder one its decoder start token first
        return out[:, 1:] if self.encoder_decoder else out[:, batch["input_ids"].shape[1] :]

    def generation_groups(self, batch: dict[str, torch.Tensor]) -> list[tuple[list[int], dict[str, Any]]]:
        """(rows, sub-batch) pairs that can share one `generate_tokens` call; all of `batch` by default. A
        family whose generation cannot take left padding splits the batch by prompt length."""
        return [(list(range(batch["input_ids"].shape[0])), batch)]

    def decode(self, processor: Any, tokens: Sequence[int] | torch.Tensor) -> str:
        """One row of `generate_tokens` as text: cut at the first end token, special tokens dropped."""
        ids = tokens.tolist() if torch.is_tensor(tokens) else list(tokens)
        return processor.tokenizer.decode(self.cut(ids), skip_special_tokens=True).strip()

    def cut(self, ids: list[int]) -> list[int]:
        """`ids` up to (without) the first end token."""
        stop = next((k for k, t in enumerate(ids) if t in self.end_token_ids), len(ids))
        return ids[:stop]

    def generate(
        self, model: Any, processor: Any, batch: dict[str, torch.Tensor], **kwargs: Any
    ) -> list[str]:
        """Decoded continuations of `batch` (prompt tokens stripped), in the order of its rows."""
        out: dict[int, str] = {}
        for rows, sub in self.generation_groups(batch):
            texts = [self.decode(processor, r) for r in self.generate_tokens(model, processor, sub, **kwargs)]
            out.update(zip(rows, texts, strict=True))
        return [out[i] for i in range(len(out))]


def to_model(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """`batch` on `device`, its floating tensors (pixels, cached features) in the model's `dtype`."""
    return {
        k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
        for k, v in batch.items()
    }
