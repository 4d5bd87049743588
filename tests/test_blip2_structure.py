"""The real Salesforce/blip2-opt-2.7b, built from its configuration on the meta device (no weights, no memory):
LoRA lands exactly where the README says, with the trainable parameter count the README states."""

import re

import pytest
import torch
from transformers import AutoModelForImageTextToText, Blip2Config

from vlmtune.config import TrainConfig
from vlmtune.families import family_for
from vlmtune.modeling import add_lora, trainable_parameters

# Salesforce/blip2-opt-2.7b's config.json (the parts that set shapes), as published on the hub.
BLIP2_OPT_2_7B = dict(
    vision_config=dict(
        hidden_size=1408,
        intermediate_size=6144,
        num_hidden_layers=39,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        qkv_bias=True,
    ),
    qformer_config=dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        cross_attention_frequency=2,
        encoder_hidden_size=1408,
        vocab_size=30522,
    ),
    text_config=dict(
        model_type="opt",
        hidden_size=2560,
        ffn_dim=10240,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=50304,
        word_embed_proj_dim=2560,
        max_position_embeddings=2048,
        bos_token_id=2,
        eos_token_id=50118,
        pad_token_id=1,
    ),
    num_query_tokens=32,
    image_token_index=50265,
)
# README: r=16 on q/k/v/out_proj and fc1/fc2 of each of OPT-2.7B's 32 layers:
# 32 * (4 * 16 * (2560 + 2560) + 2 * 16 * (2560 + 10240)) = 23,592,960.
README_TRAINABLE = 23_592_960


def lora_cfg(**kw):
    return TrainConfig(**(dict(lora_r=16, lora_alpha=32, lora_dropout=0.05) | kw))


@pytest.fixture(scope="module")
def real_blip2():
    config = Blip2Config(**BLIP2_OPT_2_7B)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return model, family_for(config)


def test_lora_lands_on_language_model_linears_only(real_blip2):
    model, family = real_blip2
    peft_model = add_lora(model, family, lora_cfg())
    wrapped = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A" in n})
    assert len(wrapped) == 32 * 6
    pattern = re.compile(
        r".*language_model\.model\.decoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc1|fc2)$"
    )
    assert all(pattern.match(n) for n in wrapped), [n for n in wrapped if not pattern.match(n)][:5]
    # The vision encoder has fc1/fc2 too; they must stay untouched, as must the Q-Former.
    assert not any("vision_model" in n or "qformer" in n for n in wrapped)
    trainable, total = trainable_parameters(peft_model)
    assert trainable == README_TRAINABLE
    assert all(p.requires_grad == (".lora_" in n) for n, p in peft_model.named_parameters())
    assert total - trainable == 3_744_761_856  # ViT-g + Q-Former + OPT-2.7B: the hub's "3.74B params"


def test_train_qformer_and_projection_are_extra_full_copies():
    config = Blip2Config(**BLIP2_OPT_2_7B)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    peft_model = add_lora(model, family_for(config), lora_cfg(train_qformer=True, train_projection=True))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("qformer" in n and "modules_to_save" in n for n in trainable)
    assert any("language_projection" in n and "modules_to_save" in n for n in trainable)
    assert not any("vision_model" in n for n in trainable)
