"""Tokenizers of each family's kind, built offline from a corpus: for tiny models (the shipped tiny base, the
tests' tiny checkpoints of every family), which must hold the real special tokens and conventions of the
family they stand for, since labels and generation are tested on them."""

from __future__ import annotations

import math
import string
from collections import Counter

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers


def _byte_level_bpe(texts: list[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    """A GPT-2-style byte-level BPE trained on `texts`, `specials` first in its vocabulary (ids 0, 1, ...)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(texts, trainer)
    return tok


def bpe_tokenizer(texts: list[str], vocab_size: int = 300):
    """OPT's layout: <s>=0, <pad>=1, </s>=2 (also BOS, put before every text), <unk>=3; <image> added."""
    from transformers import GPT2TokenizerFast

    tok = _byte_level_bpe(texts, vocab_size, ["<s>", "<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    out = GPT2TokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    out.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return out


def bart_tokenizer(texts: list[str], vocab_size: int = 300):
    """BART's layout, as Florence-2 ships it: <s>=0, <pad>=1, </s>=2, <unk>=3, every text as `<s> text </s>`,
    and the `<image>` token its processor reads as `image_token`."""
    from transformers import BartTokenizer

    tok = _byte_level_bpe(texts, vocab_size, ["<s>", "<pad>", "</s>", "<unk>", "<image>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    out = BartTokenizer(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    out.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return out


def t5_tokenizer(texts: list[str]):
    """T5's layout: <pad>=0 (also the decoder's start), </s>=1 appended to every text, <unk>=2; <image>."""
    from transformers import T5TokenizerFast

    # A sentencepiece-style unigram vocabulary written out (the trainer keeps few pieces of so small a
    # corpus): every corpus word with its "▁" word start, and every character as a fallback.
    words = Counter(w for t in texts for w in t.split())
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, math.log(n + 1)) for w, n in sorted(words.items())]
    pieces += [("▁", -5.0)] + [(c, -10.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    out = T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )
    out.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return out


def bert_tokenizer(texts: list[str]):
    """BERT's (uncased WordPiece) layout: [PAD]=0, [UNK], [CLS], [SEP], [MASK], and BLIP's [DEC].

    The vocabulary is written out, not trained: the specials, every character (alone and as a "##"
    continuation, with every ASCII letter, digit and punctuation mark) and every word of `texts`, each in sorted
    order. (tokenizers' WordPiece trainer breaks ties differently from run to run, so the tiny checkpoints
    built on it, and the tests trained on them, varied.)"""
    from transformers import BertTokenizerFast

    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = {w for t in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t))}
    chars = sorted(
        {c for w in words for c in w} | set(string.ascii_lowercase + string.digits + string.punctuation)
    )
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    pieces = [*specials, *chars, *(f"##{c}" for c in chars), *sorted(words - set(chars))]
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return BertTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[DEC]",
    )


def qwen_tokenizer(texts: list[str], vocab_size: int = 400, named: dict[str, str] | None = None):
    """Qwen2's layout: byte-level BPE with no BOS, `<|endoftext|>` (padding, the base's end), the chat markers
    `<|im_start|>` / `<|im_end|>` (an instruct model's end of turn) and the vision placeholders; `named`: more
    special tokens a processor reads by attribute name (InternVL's `context_image_token`: `<IMG_CONTEXT>`)."""
    from transformers import Qwen2TokenizerFast

    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
        *(named or {}).values(),
    ]
    # the words a chat template writes around every turn: a real Qwen vocabulary spends a token on each
    texts = [*texts, *["system\nYou are a helpful assistant.\nuser\nassistant\nDescribe this image.\n"] * 50]
    tok = _byte_level_bpe(texts, vocab_size, specials)
    out = Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        extra_special_tokens=named or {},
    )
    out.add_special_tokens({"additional_special_tokens": specials[1:]})
    return out


def smolvlm_tokenizer(texts: list[str], vocab_size: int = 400, grid: int = 4):
    """SmolVLM's layout (SmolLM2's byte-level BPE): `<|im_start|>` written by the chat template at the start,
    `<end_of_utterance>` ending each turn, and the image markers its processor writes: `<fake_token_around_image>`,
    `<global-img>`, `<row_R_col_C>` for each tile (R, C <= `grid`) and `<image>`, the one the model fills."""
    from transformers import GPT2TokenizerFast

    images = ["<fake_token_around_image>", "<image>", "<global-img>"]
    tiles = [f"<row_{r}_col_{c}>" for r in range(1, grid + 1) for c in range(1, grid + 1)]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", *images, *tiles]
    texts = [*texts, *["User: Describe this image.\nAssistant: \n\n"] * 50]
    out = GPT2TokenizerFast(
        tokenizer_object=_byte_level_bpe(texts, vocab_size, specials),
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    out.add_special_tokens({"additional_special_tokens": specials[3:]})
    return out


GEMMA3_IMAGE_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}


def gemma_tokenizer(texts: list[str], vocab_size: int = 400, images: dict[str, str] | None = None):
    """Gemma's layout: <pad>=0, <eos>=1, <bos>=2 (put before every text), <unk>=3, the turn markers
    `<start_of_turn>` / `<end_of_turn>` (an instruct model's end of turn) and the image markers the processor
    reads by name (`images`; Gemma 3's by default: `boi_token`, `eoi_token` and `image_token`)."""
    from transformers import GemmaTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    images = GEMMA3_IMAGE_TOKENS if images is None else images
    texts = [*texts, *["user\nmodel\nDescribe this image.\n\n"] * 50]
    # SentencePiece's kind, as GemmaTokenizer lays it out: spaces as "▁", bytes as <0xNN> for what the
    # vocabulary lacks
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    alphabet = sorted({c for t in texts for c in t.replace(" ", "▁")})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + 256,
        special_tokens=specials + list(images.values()) + byte_tokens,
        initial_alphabet=alphabet,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    out = GemmaTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        extra_special_tokens=images,
    )
    out.add_special_tokens({"additional_special_tokens": specials[4:] + list(images.values())})
    return out


def llama_tokenizer(texts: list[str], vocab_size: int = 400):
    """LLaMA's layout, as LLaVA's Vicuna and Mistral tokenizers have it: <unk>=0, <s>=1 (put before every
    text), </s>=2 (the end of a reply), SentencePiece-kind BPE with bytes as <0xNN>, and the legacy prefix
    space: "▁" before every text and after every special token (so "<image>\\nWhat" is "<image>", "▁", "\\n",
    "What", as transformers' LLaVA processor test has llava-1.5's tokenizer lay it out); `<image>` and `<pad>`
    added."""
    import json

    from transformers import LlamaTokenizerFast

    texts = [*texts, *["USER: ASSISTANT: [INST] [/INST] Describe this image.\n"] * 50]
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    alphabet = sorted({c for t in texts for c in t.replace(" ", "▁")} | {"▁"})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + 256,
        special_tokens=["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))],
        initial_alphabet=alphabet,
    )
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    # LlamaTokenizer builds the rest itself (Metaspace, <s> before every text, the decoder); legacy as the
    # LLaVA checkpoints are
    merges = [tuple(m) for m in model["merges"]]
    out = LlamaTokenizerFast(
        vocab=model["vocab"], merges=merges, legacy=True, add_prefix_space=True, add_bos_token=True
    )
    out.init_kwargs["legacy"] = True  # saved, so that loading builds the same pre-tokenizer
    out.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    return out
