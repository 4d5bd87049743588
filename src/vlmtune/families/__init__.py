"""Model families. A new family is a new module here plus one line in FAMILIES."""

from __future__ import annotations

from typing import Any

from .base import IGNORE_INDEX, Family, to_model, unwrap
from .blip import Blip
from .blip2 import Blip2
from .blip2_t5 import Blip2T5
from .florence2 import Florence2
from .gemma3 import Gemma3
from .instructblip import InstructBlip
from .internvl import InternVL
from .llava import Llava
from .paligemma import PaliGemma
from .qwen_vl import QwenVL
from .smolvlm import SmolVLM

FAMILIES: tuple[type[Family], ...] = (
    Blip2,
    Blip2T5,
    InstructBlip,
    Blip,
    QwenVL,
    Gemma3,
    Llava,
    InternVL,
    SmolVLM,
    PaliGemma,
    Florence2,
)


def family_for(config: Any) -> Family:
    """The family instance for a transformers config; a clear error for a model vlmtune cannot train."""
    for family in FAMILIES:
        if family.matches(config):
            return family(config)
    text = getattr(getattr(config, "text_config", None), "model_type", None)
    what = f"{getattr(config, 'model_type', '?')!r}" + (f" with a {text} language model" if text else "")
    known = "; ".join(f"{f.name} ({', '.join(f.hub_ids[:2])})" for f in FAMILIES)
    raise ValueError(
        f"vlmtune does not support model type {what} yet. Supported: {known}. See `vlmtune models`."
    )


__all__ = ["FAMILIES", "IGNORE_INDEX", "Family", "family_for", "to_model", "unwrap"]
