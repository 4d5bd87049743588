"""Build and pretrain `tiny-blip2`, the small BLIP-2 that `--model tiny` names.

    python scripts/make_tiny_base.py --minutes 12

Same architecture as Salesforce/blip2-opt-2.7b (ViT + Q-Former + OPT, image placeholders, "\\n" as the end of
a caption), about 0.9M parameters, with a byte-level BPE tokenizer like OPT's so any caption can be spelled.
It is pretrained from scratch, on the CPU, on procedurally drawn shapes (captions and questions) and, for the
language model alone, on English prose from Python's own documentation. So it already sees colours, shapes and
positions, and already writes English, before anyone fine-tunes it; the football demo is a new caption domain.

Everything is seeded, but wall-clock-bounded training on a CPU is not bitwise reproducible across machines;
the committed weights are the record, and the model card written next to them states how they were made.
"""

from __future__ import annotations

import argparse
import json
import math
import pydoc_data.topics
import random
import time
from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessorPil,
    GenerationConfig,
)

from vlmtune.data.synthetic import examples
from vlmtune.families import family_for
from vlmtune.tiny import bpe_tokenizer

OUT = Path(__file__).resolve().parents[1] / "src" / "vlmtune" / "assets" / "tiny-blip2"
IMAGE_SIZE, QUERY_TOKENS = 64, 8


def prose() -> list[str]:
    """Paragraphs of English (Python's reference docs ship with the interpreter): language-model pretraining."""
    text = "\n".join(pydoc_data.topics.topics.values())
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    return [p for p in paras if len(p) > 80 and not p.startswith(("::", ">>>", "*"))]


def build_config(vocab_size: int, newline_id: int, image_token_id: int) -> Blip2Config:
    return Blip2Config(
        # Blip2VisionConfig's default initializer_range is 1e-10 (the real one is always loaded pretrained):
        # trained from scratch, such a vision tower starts dead. 0.02 like everything else.
        vision_config=dict(
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=8,
            initializer_range=0.02,
        ),
        qformer_config=dict(
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            cross_attention_frequency=1,
            encoder_hidden_size=64,
            vocab_size=8,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
        text_config=dict(
            model_type="opt",
            vocab_size=vocab_size,
            hidden_size=128,
            word_embed_proj_dim=128,
            ffn_dim=384,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=128,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=newline_id,
            dropout=0.0,
        ),
        num_query_tokens=QUERY_TOKENS,
        image_token_index=image_token_id,
    )


def shapes_batch(rows, rng: random.Random, qa_share: float = 0.3):
    images, prompts, targets = [], [], []
    for r in rows:
        images.append(r.image)
        if r.qa and rng.random() < qa_share:
            q, a = rng.choice(r.qa)
            prompts.append(f"Question: {q} Answer:")
            targets.append(a)
        else:
            prompts.append("")
            targets.append(r.text)
    return images, prompts, targets


@torch.no_grad()
def exact_match(model, processor, family, rows) -> float:
    model.eval()
    batch = family.encode(
        processor, [r.image for r in rows], [""] * len(rows), None, max_length=64, padding_side="left"
    )
    batch = {k: v.to(model.device) for k, v in batch.items()}
    got = family.generate(model, processor, batch, max_new_tokens=40)
    model.train()
    return sum(g == r.text for g, r in zip(got, rows, strict=True)) / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=12.0, help="wall-clock training budget")
    ap.add_argument("--images", type=int, default=6000, help="distinct training images")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the same recipe, more steps in the budget)")
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)

    # Images are drawn at 128 px and shrunk once here, so the per-step processor work is just normalisation.
    train = [
        r.__class__(r.image.resize((IMAGE_SIZE, IMAGE_SIZE)), r.text, r.qa)
        for r in examples("shapes", args.images, seed=100)
    ]
    held_out = list(examples("shapes", 64, seed=101))
    paragraphs = prose()

    tokenizer = bpe_tokenizer(
        [r.text for r in train] + [f"{q} {a}" for r in train for q, a in r.qa] + paragraphs, vocab_size=512
    )
    processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer,
        num_query_tokens=QUERY_TOKENS,
    )
    newline = tokenizer.convert_tokens_to_ids(
        "Ċ"
    )  # byte-level BPE's "\n", as id 50118 is in OPT's vocabulary
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    config = build_config(len(tokenizer), newline, image_token)
    model = Blip2ForConditionalGeneration(config).to(args.device)
    # transformers starts the query tokens at zero: every query then attends identically and training from
    # scratch stalls. A small random start breaks the symmetry.
    torch.nn.init.normal_(model.query_tokens, std=0.02)
    family = family_for(config)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}; vocabulary: {len(tokenizer)}")

    text_ids = [tokenizer(p)["input_ids"][:48] for p in paragraphs]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    budget, warmup = args.minutes * 60, 200
    start, step = time.time(), 0
    model.train()
    while (elapsed := time.time() - start) < budget:
        lr = (
            args.lr
            * min(1.0, (step + 1) / warmup)
            * 0.5
            * (1 + math.cos(math.pi * min(1.0, elapsed / budget)))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        rows = rng.sample(train, args.batch_size)
        batch = family.encode(processor, *shapes_batch(rows, rng), max_length=48, padding_side="right")
        batch = {k: v.to(args.device) for k, v in batch.items()}
        loss = model(**batch).loss
        chunk = rng.sample(text_ids, 16)
        width = max(map(len, chunk))
        ids = torch.tensor([c + [1] * (width - len(c)) for c in chunk], device=args.device)
        labels = torch.tensor([c + [-100] * (width - len(c)) for c in chunk], device=args.device)
        lm_loss = model.language_model(
            input_ids=ids, attention_mask=(labels != -100).long(), labels=labels
        ).loss
        (loss + 0.5 * lm_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 250 == 0:
            em = exact_match(model, processor, family, held_out)
            print(
                f"step {step:5d}  {elapsed:6.0f}s  caption loss {loss.item():.3f}  lm loss {lm_loss.item():.3f}  "
                f"held-out exact match {em:.0%}",
                flush=True,
            )

    em = exact_match(model, processor, family, held_out)
    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=2, pad_token_id=1, eos_token_id=newline, max_new_tokens=40
    )
    model.cpu().save_pretrained(args.out)
    processor.save_pretrained(args.out)
    card = {
        "made_by": "scripts/make_tiny_base.py",
        "args": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "steps": step,
        "minutes": round((time.time() - start) / 60, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "held_out_shapes_exact_match": em,
        "torch": str(torch.__version__),
        "device": args.device,
    }
    (args.out / "vlmtune_card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
