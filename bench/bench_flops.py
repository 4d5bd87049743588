"""Model FLOPs of LoRA training on BLIP-2, counted from the config, for model FLOPs utilisation (MFU).

Per training sample (T = query tokens + caption tokens):
- language model: forward 2 x (linear weights) x T plus the output head over the caption positions
  (2 x d x vocab x (caption tokens + 1): no logits for the image placeholders) plus attention
  (4 x T^2 x d per layer); backward computes activation gradients only (frozen weights need no weight
  gradients), about as much again, so 2 x forward;
- vision side (ViT over 257 tokens, Q-Former): forward only, once per image when cached (so / epochs), every
  step when not.
LoRA's own matmuls (rank 16) add under 1% and are left out. MFU = executed FLOPs / seconds / peak.
"""

from __future__ import annotations

import torch

PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s


def _linear_params(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def per_sample(model_dir: str, text_tokens: float, epochs: int, cached: bool) -> dict:
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    t = config.num_query_tokens + text_tokens
    text = config.text_config
    lm_layers = model.language_model.model.decoder.layers
    # The output head runs from the position before the first caption token on (`Family.loss_inputs`).
    lm_fwd = 2 * _linear_params(lm_layers) * t + 2 * text.hidden_size * text.vocab_size * (text_tokens + 1)
    lm_fwd += 4 * t * t * text.hidden_size * text.num_hidden_layers
    v = config.vision_config
    patches = (v.image_size // v.patch_size) ** 2 + 1
    vision = (
        2 * _linear_params(model.vision_model) * patches
        + 4 * patches**2 * v.hidden_size * v.num_hidden_layers
    )
    vision += (
        2 * _linear_params(model.qformer) * config.num_query_tokens
    )  # queries; cross-attn keys over patches:
    vision += (
        2
        * patches
        * config.qformer_config.encoder_hidden_size
        * config.qformer_config.hidden_size
        * 2
        * (config.qformer_config.num_hidden_layers // config.qformer_config.cross_attention_frequency)
    )
    return {"lm": 2 * lm_fwd, "vision": vision / epochs if cached else vision}


def utilisation(model_dir: str, result: dict, epochs: int, device: str) -> dict:
    """FLOPs per sample and, on a known GPU, MFU for a vlmtune training result."""
    from transformers import AutoProcessor

    from vlmtune.data.synthetic import examples

    tok = AutoProcessor.from_pretrained(model_dir).tokenizer
    texts = [e.text for e in examples("football", 64, 0)]
    text_tokens = sum(len(tok(t)["input_ids"]) + 1 for t in texts) / len(texts)  # BOS .. EOS
    flops = per_sample(model_dir, text_tokens, epochs, cached=result.get("cache_s", 0) > 0)
    out = {"tflop_per_sample": (flops["lm"] + flops["vision"]) / 1e12, "text_tokens": text_tokens}
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((p for k, p in PEAK.items() if k in name), None)
        if peak:
            out["mfu"] = out["tflop_per_sample"] * 1e12 * result["samples"] / result["seconds"] / peak
    return out
