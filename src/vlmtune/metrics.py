"""Simple per-caption scores. (Corpus metrics such as CIDEr and BLEU belong to evaluation, not here.)"""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased words without punctuation: 'A Player, in red.' -> ['a', 'player', 'in', 'red']."""
    return _WORD.findall(text.lower())


def exact_match(prediction: str, reference: str) -> float:
    return float(words(prediction) == words(reference))


def token_accuracy(prediction: str, reference: str) -> float:
    """Share of word positions where prediction and reference agree, over the longer of the two.

    Position-wise, so a caption that says the right words in the wrong slots scores low, and extra or missing
    words count against it: 'a red ball' vs 'a red ball' = 1.0, vs 'a blue ball' = 2/3, vs 'a red' = 2/3.
    """
    p, r = words(prediction), words(reference)
    if not p and not r:
        return 1.0
    return sum(a == b for a, b in zip(p, r)) / max(len(p), len(r))  # noqa: B905 (lengths may differ)
