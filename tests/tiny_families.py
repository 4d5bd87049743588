"""Tiny random checkpoints of every family, built offline from config and saved in the standard on-disk
layout (config.json, safetensors, processor and tokenizer files), as the hub's would be.

Each holds its family's real tokenizer kind and special tokens (OPT's byte-level BPE ending captions with "\\n",
T5's unigram ending with `</s>`, BERT's WordPiece with BLIP's [DEC] start and [SEP] end), trained on a small
corpus here, so labels and generation are tested on the real conventions. Weights are random: fine for the
contract suite, which trains them a little; the demo stays on the pretrained tiny BLIP-2.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from vlmtune.data.synthetic import examples
from vlmtune.tiny import (
    bart_tokenizer,
    bert_tokenizer,
    bpe_tokenizer,
    gemma_tokenizer,
    llama_tokenizer,
    qwen_tokenizer,
    smolvlm_tokenizer,
    t5_tokenizer,
)

IMAGE = 32  # pixels: 16 patches of 8
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=IMAGE,
    patch_size=8,
    initializer_range=0.02,  # Blip2VisionConfig's default (1e-10) makes a dead tower from scratch
)
QFORMER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    encoder_hidden_size=32,
    cross_attention_frequency=1,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
QUERIES = 4
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)  # every tiny LM
# LOGIT_RANGE: behind a frozen final norm and output layer, LoRA can only turn a 32-wide hidden state of fixed
# norm; with output rows of the usual std 0.02 no logit can then exceed the 300 others by more than ~0.6, and
# no amount of training gets the loss far below log(vocab) (std 0.2: a floor of ~0.7 per token, measured).
# The random language models start at std 0.2, their output rows at std 0.8 (pretrained ones have large
# output rows anyway).


def corpus() -> list[str]:
    rows = list(examples("football", 200, seed=7))
    texts = [r.text for r in rows] + [f"Question: {q} Answer: {a}" for r in rows for q, a in r.qa]
    return texts + [
        "A short image caption:",
        "a photo of",
        "Question: what colour is the ball? Answer: how many players are there?",
        "red blue green white",
    ]


def _image_processor():
    from transformers import BlipImageProcessor

    return BlipImageProcessor(size={"height": IMAGE, "width": IMAGE})


def _opt(tok) -> dict:
    newline = tok.convert_tokens_to_ids("Ċ")  # byte-level "\n", as 50118 is in OPT's vocabulary
    return dict(
        model_type="opt",
        vocab_size=len(tok),
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        bos_token_id=2,
        pad_token_id=1,
        eos_token_id=newline,
        dropout=0.0,
    )


def _llama(tok) -> dict:
    return dict(
        model_type="llama",
        **TEXT,
        vocab_size=len(tok),
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=2,
        pad_token_id=1,
        eos_token_id=2,  # Vicuna ends with </s>
        initializer_range=0.2,  # see LOGIT_RANGE
    )


def _t5(tok) -> dict:
    return dict(
        model_type="t5",
        vocab_size=len(tok),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",  # Flan-T5's: wi_0, wi_1, wo
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        dropout_rate=0.0,
        tie_word_embeddings=False,
    )


def _save(model, processor, out: Path) -> Path:
    torch.manual_seed(0)
    if hasattr(model, "query_tokens"):  # zero queries all attend alike: a tiny model then never learns
        torch.nn.init.normal_(model.query_tokens, std=0.02)
    with torch.no_grad():  # see LOGIT_RANGE
        rows = (model.get_output_embeddings() or model.text_decoder.get_output_embeddings()).weight
        rows.mul_(max(1.0, 0.8 / float(rows.std())))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_blip2(out: Path, lm: str = "opt") -> Path:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    texts = corpus()
    tok = t5_tokenizer(texts) if lm == "t5" else bpe_tokenizer(texts)
    text = _t5(tok) if lm == "t5" else _opt(tok)
    config = Blip2Config(
        vision_config=VISION,
        qformer_config=QFORMER,
        text_config=text,
        num_query_tokens=QUERIES,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config)
    processor = Blip2Processor(image_processor=_image_processor(), tokenizer=tok, num_query_tokens=QUERIES)
    return _save(model, processor, out)


def build_instructblip(out: Path, lm: str = "llama") -> Path:
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor

    texts = corpus()
    tok = t5_tokenizer(texts) if lm == "t5" else bpe_tokenizer(texts)
    qtok = bert_tokenizer(texts)
    text = _t5(tok) if lm == "t5" else _llama(tok)
    config = InstructBlipConfig(
        vision_config=VISION,
        qformer_config=dict(QFORMER, vocab_size=len(qtok), pad_token_id=0),
        text_config=text,
        num_query_tokens=QUERIES,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration(config)
    processor = InstructBlipProcessor(
        image_processor=_image_processor(), tokenizer=tok, qformer_tokenizer=qtok, num_query_tokens=QUERIES
    )
    return _save(model, processor, out)


def build_blip(out: Path) -> Path:
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

    tok = bert_tokenizer(corpus())
    config = BlipConfig(
        vision_config=dict(VISION, initializer_range=0.02),
        text_config=dict(
            **TEXT,
            vocab_size=len(tok),
            encoder_hidden_size=32,
            max_position_embeddings=64,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.convert_tokens_to_ids("[DEC]"),
            sep_token_id=tok.sep_token_id,
            eos_token_id=tok.sep_token_id,
            initializer_range=0.2,  # see LOGIT_RANGE
        ),
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    processor = BlipProcessor(image_processor=_image_processor(), tokenizer=tok)
    return _save(model, processor, out)


# The chat template Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct ship (their chat_template.json), verbatim.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string "
    "%}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if "
    "content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = "
    "image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif "
    "%}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content "
    "%}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value "
    "}}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ "
    "content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt "
    "%}<|im_start|>assistant\n{% endif %}"
)


# Qwen3-VL-*-Instruct's chat template is not available offline; this one is written here to render user and
# assistant turns as it does ("<|im_start|>role\n...<|im_end|>\n", no default system turn, the image as
# <|vision_start|><|image_pad|><|vision_end|>, the generation prompt "<|im_start|>assistant\n"). vlmtune lays
# out examples with whatever template a checkpoint carries, so only this test's fidelity rests on it.
QWEN3_VL_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' }}{%- if message['content'] is "
    "string %}{{- message['content'] }}{%- else %}{%- for content in message['content'] %}{%- if content['type'] "
    "== 'image' or 'image' in content or 'image_url' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- endif %}"
)


def build_qwen_vl(out: Path, kind: str = "qwen2_vl") -> Path:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: 8-pixel patches merged 2 x 2, so a 32 x 32 image gives 4 image tokens
    (a larger one more), between the real special tokens, with the real chat template (Qwen3-VL's: see
    QWEN3_VL_TEMPLATE)."""
    import transformers

    names = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3VL"}[kind]
    tok = qwen_tokenizer(corpus())
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>")}  # fmt: skip
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, patch_size=8, spatial_merge_size=2)
    if kind == "qwen2_5_vl":  # its own names: hidden_size is the tower's width, out_hidden_size the merger's
        vision = dict(
            vision, hidden_size=32, out_hidden_size=32, intermediate_size=64, fullatt_block_indexes=[1]
        )
        vision["window_size"] = 32
    if kind == "qwen3_vl":  # learnt positions over a 4 x 4 grid, one deepstack merger after the first block
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
            out_hidden_size=32, num_position_embeddings=16, deepstack_visual_indexes=[0],
        )  # fmt: skip
    text = dict(
        **TEXT,
        vocab_size=len(tok),
        num_key_value_heads=1,
        max_position_embeddings=1024,
        # head_dim 16: 8 rotary frequencies, split between time, height and width
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,  # Qwen adds none
        initializer_range=0.2,  # see LOGIT_RANGE
        tie_word_embeddings=False,
    )
    if kind == "qwen3_vl":
        text.update(head_dim=16, rope_parameters=dict(text["rope_parameters"], mrope_interleaved=True))
    vision = dict(vision, temporal_patch_size=2, initializer_range=0.02)
    if kind != "qwen3_vl":
        vision["mlp_ratio"] = 2
    config = getattr(transformers, f"{names}Config")(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = getattr(transformers, f"{names}ForConditionalGeneration")(config)
    images = transformers.Qwen2VLImageProcessor(
        patch_size=8,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64},
    )
    video_kind = "Qwen3VL" if kind == "qwen3_vl" else "Qwen2VL"
    videos = getattr(transformers, f"{video_kind}VideoProcessor")(
        patch_size=8, merge_size=2, temporal_patch_size=2
    )
    template = QWEN3_VL_TEMPLATE if kind == "qwen3_vl" else QWEN2_VL_TEMPLATE
    processor = getattr(transformers, f"{names}Processor")(
        image_processor=images, tokenizer=tok, video_processor=videos, chat_template=template
    )
    return _save(model, processor, out)


# The chat template of google/gemma-3-*-it, as transformers' own Gemma 3 processor tests carry it.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- set first_user_prefix = "
    "messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- set loop_messages = messages[1:] -%}\n{%- else "
    '-%}\n    {%- set first_user_prefix = "" -%}\n    {%- set loop_messages = messages -%}\n{%- endif '
    "-%}\n{%- for message in loop_messages -%}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 "
    '== 0) -%}\n        {{ raise_exception("Conversation roles must alternate '
    "user/assistant/user/assistant/...\") }}\n    {%- endif -%}\n    {%- if (message['role'] == 'assistant') "
    "-%}\n        {%- set role = \"model\" -%}\n    {%- else -%}\n        {%- set role = message['role'] "
    "-%}\n    {%- endif -%}\n    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "
    "\"\") }}\n    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n    "
    "{%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n            "
    "{%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n            {%- elif "
    "item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n            {%- endif -%}\n        "
    '{%- endfor -%}\n    {%- else -%}\n        {{ raise_exception("Invalid content type") }}\n    {%- endif '
    "-%}\n    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    "
    "{{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)


def build_gemma3(out: Path) -> Path:
    """Gemma 3: a 32-pixel SigLIP over 8-pixel patches, pooled 2 x 2 to 4 image tokens, sliding and full
    attention layers, the real special tokens and chat template."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    tok = gemma_tokenizer(corpus())
    config = Gemma3Config(
        text_config=dict(
            **TEXT,
            vocab_size=len(tok),
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=64,
            max_position_embeddings=1024,
            pad_token_id=0,
            eos_token_id=[1, tok.convert_tokens_to_ids("<end_of_turn>")],
            bos_token_id=2,
            initializer_range=0.2,  # see LOGIT_RANGE
            tie_word_embeddings=False,
        ),
        vision_config=dict(VISION, model_type="siglip_vision_model", vision_use_head=False),
        mm_tokens_per_image=4,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    images = Gemma3ImageProcessor(size={"height": IMAGE, "width": IMAGE})
    processor = Gemma3Processor(
        image_processor=images, tokenizer=tok, chat_template=GEMMA3_TEMPLATE, image_seq_length=4
    )
    return _save(model, processor, out)


# llava-hf/llava-1.5-*-hf's chat template, as transformers' LLaVA processor tests carry it: it ends no reply.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% "
    "endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ "
    "content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif "
    "%}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# llava-hf/llava-v1.6-mistral-7b-hf's, as its processor renders it: "[INST] <image>\n... [/INST] reply</s> ".
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + "
    "message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# "
    "Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') "
    "%}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif "
    "message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}{{ "
    "raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def build_llava(out: Path, kind: str = "llava") -> Path:
    """LLaVA-1.5 (a 32-pixel CLIP over 8-pixel patches: 16 image tokens) or LLaVA-NeXT (the same CLIP over
    anyres tiles of 32 x 64 / 64 x 32 / 64 x 64: a count that varies with the image), a LLaMA language
    model with the legacy SentencePiece tokenizer, the real chat templates."""
    import transformers

    tok = llama_tokenizer(corpus())
    next_ = kind == "llava_next"
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    config = getattr(transformers, "LlavaNextConfig" if next_ else "LlavaConfig")(
        vision_config=dict(
            {k: v for k, v in VISION.items() if k != "initializer_range"},
            model_type="clip_vision_model",
            projection_dim=32,
        ),
        text_config=dict(
            _llama(tok),
            num_key_value_heads=1,
            max_position_embeddings=1024,
            eos_token_id=2,
            pad_token_id=tok.pad_token_id,
            bos_token_id=1,
            tie_word_embeddings=False,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **({"image_grid_pinpoints": pinpoints} if next_ else {}),
    )
    torch.manual_seed(0)
    cls = "LlavaNextForConditionalGeneration" if next_ else "LlavaForConditionalGeneration"
    model = getattr(transformers, cls)(config)
    sizes = dict(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    if next_:
        images = transformers.LlavaNextImageProcessor(**sizes, image_grid_pinpoints=pinpoints)
        processor = transformers.LlavaNextProcessor(
            image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=LLAVA_NEXT_TEMPLATE,
        )  # fmt: skip
    else:
        processor = transformers.LlavaProcessor(
            image_processor=transformers.CLIPImageProcessor(**sizes), tokenizer=tok, patch_size=8,
            vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE,
        )  # fmt: skip
    return _save(model, processor, out)


# The chat template of OpenGVLab/InternVL3-*-hf, as transformers' conversion script (convert_internvl_weights_to_hf)
# writes it into the checkpoints it converts.
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is "
    "string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] "
    "== 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif "
    "content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% "
    "endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


def build_internvl(out: Path) -> Path:
    """InternVL 3: a 32-pixel InternViT over 8-pixel patches, pixel-shuffled to 4 tokens a tile; images tiled
    into up to 4 tiles (and a thumbnail) of 32 x 32, so a 64 x 32 image gives 12 tokens; a Qwen2 language
    model, the real special tokens (`<img>`, `<IMG_CONTEXT>`, `</img>`) and chat template."""
    import transformers

    named = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tok = qwen_tokenizer(corpus(), named=named)
    config = transformers.InternVLConfig(
        vision_config=dict(
            {k: v for k, v in VISION.items() if k != "image_size" and k != "patch_size"},
            image_size=[IMAGE, IMAGE],
            patch_size=[8, 8],
        ),
        text_config=dict(
            model_type="qwen2",
            **TEXT,
            vocab_size=len(tok),
            num_key_value_heads=1,
            max_position_embeddings=1024,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tok.pad_token_id,
            bos_token_id=None,
            initializer_range=0.2,  # see LOGIT_RANGE
            tie_word_embeddings=False,
        ),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.InternVLForConditionalGeneration(config)
    images = transformers.GotOcr2ImageProcessor(
        size={"height": IMAGE, "width": IMAGE}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    videos = transformers.InternVLVideoProcessor(size={"height": IMAGE, "width": IMAGE})
    processor = transformers.InternVLProcessor(
        image_processor=images,
        tokenizer=tok,
        video_processor=videos,
        image_seq_length=4,
        chat_template=INTERNVL_TEMPLATE,
    )
    return _save(model, processor, out)


# HuggingFaceTB/SmolVLM-*-Instruct's chat template, as transformers' SmolVLM processor tests carry it.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] "
    "== 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == "
    "'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor "
    "%}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_smolvlm(out: Path, kind: str = "smolvlm") -> Path:
    """SmolVLM (or Idefics3, its parent: the same layout under other class names): a 32-pixel SigLIP over
    8-pixel patches, pixel-shuffled 2 x 2 to 4 tokens a tile; images resized to a longest edge of 64 and split
    into 32-pixel tiles plus the global view (a 32 x 32 image: 4 tiles + 1, 20 tokens), a LLaMA-kind language
    model, the real special tokens and SmolVLM's chat template."""
    import transformers

    names = {"smolvlm": "SmolVLM", "idefics3": "Idefics3"}[kind]
    tok = smolvlm_tokenizer(corpus())
    config = getattr(transformers, f"{names}Config")(
        vision_config=dict(VISION, model_type=f"{kind}_vision"),
        text_config=dict(
            _llama(tok),
            num_key_value_heads=1,
            max_position_embeddings=1024,
            eos_token_id=tok.convert_tokens_to_ids("<end_of_utterance>"),
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            tie_word_embeddings=False,
        ),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = getattr(transformers, f"{names}ForConditionalGeneration")(config)
    images = getattr(transformers, f"{names}ImageProcessor")(
        do_image_splitting=True, size={"longest_edge": 2 * IMAGE}, max_image_size={"longest_edge": IMAGE}
    )
    parts = dict(image_processor=images, tokenizer=tok, image_seq_len=4, chat_template=SMOLVLM_TEMPLATE)
    if kind == "smolvlm":
        parts["video_processor"] = transformers.SmolVLMVideoProcessor(max_image_size={"longest_edge": IMAGE})
    return _save(model, getattr(transformers, f"{names}Processor")(**parts), out)


def build_paligemma(out: Path) -> Path:
    """PaliGemma 2: a 32-pixel SigLIP over 8-pixel patches (16 image tokens), a Gemma 2 language model, Gemma's
    tokenizer with the `<image>` token and the 1,152 `<locNNNN>` / `<segNNN>` tokens the processor adds."""
    import transformers

    tok = gemma_tokenizer(corpus() + ["caption en\n", "answer en "] * 20, images={})
    images = transformers.SiglipImageProcessor(size={"height": IMAGE, "width": IMAGE})
    images.image_seq_length = (IMAGE // 8) ** 2  # the processor reads it, as PaliGemma's checkpoints save it
    processor = transformers.PaliGemmaProcessor(image_processor=images, tokenizer=tok)  # adds its tokens
    config = transformers.PaliGemmaConfig(
        vision_config=dict(VISION, model_type="siglip_vision_model", vision_use_head=False),
        text_config=dict(
            model_type="gemma2",
            **TEXT,
            vocab_size=len(tok),
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=64,
            max_position_embeddings=1024,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            initializer_range=0.2,  # see LOGIT_RANGE
            tie_word_embeddings=False,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vocab_size=len(tok),
        projection_dim=32,
        hidden_size=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration(config)
    return _save(model, processor, out)


def build_florence2(out: Path) -> Path:
    """Florence-2: a two-stage DaViT over a 32-pixel image (strides 4 then 2: a 4 x 4 grid, 16 + 1 pooled =
    17 image tokens), a BART encoder-decoder, BART's tokenizer kind with the `<image>` token."""
    import transformers

    tok = bart_tokenizer(corpus() + ["What does the image describe?"] * 20)
    images = transformers.CLIPImageProcessor(
        size={"height": IMAGE, "width": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}
    )
    images.image_seq_length = 17  # the processor reads it, as Florence-2's checkpoints save it
    vision = dict(
        depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1], patch_prenorm=[False, True],
        embed_dim=[16, 32], num_heads=[2, 2], num_groups=[2, 2], window_size=4, projection_dim=32,
        max_temporal_embeddings=4, max_position_embeddings=8, drop_path_rate=0.0,
    )  # fmt: skip
    config = transformers.Florence2Config(
        vision_config=vision,
        text_config=dict(
            model_type="bart",
            vocab_size=len(tok),
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=128,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            dropout=0.0,
            init_std=0.2,  # see LOGIT_RANGE
        ),  # fmt: skip
        image_token_id=tok.image_token_id,
    )
    torch.manual_seed(0)
    model = transformers.Florence2ForConditionalGeneration(config)
    processor = transformers.Florence2Processor(image_processor=images, tokenizer=tok)
    return _save(model, processor, out)


BUILDERS = {
    "blip-2-t5": lambda out: build_blip2(out, "t5"),
    "instructblip-vicuna": lambda out: build_instructblip(out, "llama"),
    "instructblip-t5": lambda out: build_instructblip(out, "t5"),
    "blip": build_blip,
    "qwen2-vl": build_qwen_vl,
    "qwen2.5-vl": lambda out: build_qwen_vl(out, "qwen2_5_vl"),
    "qwen3-vl": lambda out: build_qwen_vl(out, "qwen3_vl"),
    "gemma-3": build_gemma3,
    "llava-1.5": build_llava,
    "llava-next": lambda out: build_llava(out, "llava_next"),
    "internvl": build_internvl,
    "smolvlm": build_smolvlm,
    "paligemma-2": build_paligemma,
    "florence-2": build_florence2,
}
# Families' other members, built for the chat-family tests only (the contract runs one member per family).
MEMBERS = {"idefics3": lambda out: build_smolvlm(out, "idefics3")}


def colour_examples(n: int = 4, seed: int = 0):
    """`n` flat colour images with a caption each: a task a tiny model learns in a few steps only by
    looking at the image (the captions share no word order to guess from)."""
    from PIL import Image

    colours = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 200, 40), "white": (250, 250, 250)}
    words = list(colours)[:n]
    rng = random.Random(seed)
    captions = {w: f"a {w} ball on the {rng.choice(['left', 'right'])}" for w in words}
    return [(Image.new("RGB", (IMAGE, IMAGE), colours[w]), captions[w]) for w in words]
