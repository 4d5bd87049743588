"""BLIP-2 with Flan-T5 (`Salesforce/blip2-flan-t5-xl`, the BLIP-2 most people use): an encoder-decoder
language model. The image tokens and the prompt go to T5's encoder (its tokenizer ends the prompt with
`</s>`); the target is the decoder's sequence, ended by `</s>` (id 1), which the model shifts right itself
to make the decoder's input. LoRA wraps T5's attention (q, k, v, o) and gated MLP (wi_0, wi_1, wo) layers.
"""

from __future__ import annotations

from .blip2 import Blip2


class Blip2T5(Blip2):
    name = "blip-2-t5"
    hub_ids = (
        "Salesforce/blip2-flan-t5-xl",
        "Salesforce/blip2-flan-t5-xl-coco",
        "Salesforce/blip2-flan-t5-xxl",
    )
    lora = "every T5 linear: q, k, v, o, wi_0, wi_1, wo (encoder and decoder)"
    memory = "Flan-T5-XL (3.9B in all): ~10 GiB bf16 LoRA, ~6 GiB QLoRA (estimated from the weights)"
    encoder_decoder = True
    lm_types = ("t5",)
