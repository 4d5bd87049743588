"""Model families. A new family is a new module here plus one line in FAMILIES."""

from __future__ import annotations

from typing import Any

from .base import IGNORE_INDEX, Family
from .blip2 import Blip2

FAMILIES: tuple[type[Family], ...] = (Blip2,)


def family_for(config: Any) -> Family:
    """The family instance for a transformers config; a clear error for a model vlmtune cannot train."""
    for family in FAMILIES:
        if family.matches(config):
            return family(config)
    known = ", ".join(f.name for f in FAMILIES)
    raise ValueError(
        f"vlmtune does not support model type {getattr(config, 'model_type', '?')!r} yet (supported: {known})."
    )


__all__ = ["FAMILIES", "IGNORE_INDEX", "Family", "family_for"]
