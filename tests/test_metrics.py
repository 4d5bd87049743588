"""Metric values checked against hand computation and the reference implementation (pycocoevalcap)."""

import math

import pytest

from vlmtune.metrics import (
    caption_scores,
    exact_match,
    java_available,
    normalize_answer,
    token_accuracy,
    vqa_accuracy,
    vqa_scores,
)

needs_java = pytest.mark.skipif(not java_available(), reason="the PTB tokenizer and METEOR need Java")


@pytest.mark.parametrize("use_java", [pytest.param(True, marks=needs_java), False])
def test_bleu_and_rouge_by_hand(use_java):
    s = caption_scores({"1": "a man rides a horse"}, {"1": ["a man rides a horse on the beach"]}, use_java)[
        "scores"
    ]
    # Every n-gram of the 5-word candidate is in the 8-word reference: precisions 1, brevity penalty e^(1-8/5).
    for n in (1, 2, 3, 4):
        assert s[f"BLEU-{n}"] == pytest.approx(math.exp(1 - 8 / 5), rel=1e-6)
    # ROUGE-L: LCS 5, precision 5/5, recall 5/8, F with beta 1.2 = (1+b^2) P R / (R + b^2 P).
    p, r, b2 = 1.0, 5 / 8, 1.2**2
    assert s["ROUGE-L"] == pytest.approx((1 + b2) * p * r / (r + b2 * p), rel=1e-6)
    # CIDEr-D weighs n-grams by how rare they are across the references; with one image nothing is rare.
    assert s["CIDEr-D"] == 0.0
    assert ("METEOR" in s) == use_java


SMALL = (
    {"a": "a red ball on grass", "b": "two dogs in the snow", "c": "a cat on a sofa"},
    {
        "a": ["a red ball on the grass", "a ball on grass"],
        "b": ["Two dogs play in the snow."],
        "c": ["a cat sleeping on a sofa", "A grey cat on a couch"],
    },
)


@needs_java
def test_reference_values_with_the_ptb_tokenizer():
    """Values pycocoevalcap 1.2 gives on this example (its own scorers, run once and written down)."""
    result = caption_scores(*SMALL)
    assert result["scores"] == pytest.approx(
        {
            "BLEU-1": 0.9355069849068837,
            "BLEU-2": 0.8956797468377858,
            "BLEU-3": 0.7938779894790408,
            "BLEU-4": 0.528493033491096,
            "METEOR": 0.41526678658676425,
            "ROUGE-L": 0.9296187683284457,
            "CIDEr-D": 4.624012412534854,
        },
        rel=1e-9,
    )
    assert result["tokenizer"].startswith("PTBTokenizer")


def test_fallback_tokenizer_agrees_on_plain_captions():
    """Without Java: same BLEU / ROUGE-L / CIDEr-D on captions whose PTB tokens are plain words."""
    result = caption_scores(*SMALL, use_java=False)
    assert result["scores"]["CIDEr-D"] == pytest.approx(4.624012412534854, rel=1e-9)
    assert result["scores"]["BLEU-4"] == pytest.approx(0.528493033491096, rel=1e-9)
    assert "METEOR" not in result["scores"]
    assert any("Java not found" in n for n in result["notes"])
    assert any("SPICE" in n for n in result["notes"])


def test_missing_reference_is_named():
    with pytest.raises(ValueError, match="no reference caption"):
        caption_scores({"x": "a cat"}, {"x": []}, use_java=False)


@pytest.mark.parametrize(
    "answer, normal",
    [
        ("Two dogs.", "2 dogs"),
        ("the beach", "beach"),
        ("A Dog", "dog"),
        ("yes!", "yes"),
        ("dont", "don't"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("red-white", "red white"),
    ],
)
def test_answer_normalisation(answer, normal):
    assert normalize_answer(answer) == normal


def test_vqa_accuracy_by_hand():
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    # 3 of 10 humans said two: leaving out one of those 3 leaves 2 matches (2/3), else 3 (1): (3*2/3 + 7)/10.
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("a dog", ["dog"] * 5 + ["cat"] * 5) == 1.0  # the article goes
    assert vqa_accuracy("horse", ["dog"] * 10) == 0.0
    # As the official evaluation does, answers are normalised only when the humans disagree, so unanimous
    # answers must be matched as written.
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    s = vqa_scores(["two", "cat"], [["2"] * 9 + ["3"], ["dog"] * 6 + ["cat"] * 4])
    assert s["VQA accuracy"] == 1.0  # 'cat' from 4 humans is fully right; 'two' normalises to '2'
    assert s["exact match"] == 0.5  # against the most common answer: '2' yes, 'dog' no


def test_per_caption_scores():
    assert exact_match("A red ball.", "a red ball") == 1.0
    assert token_accuracy("a blue ball", "a red ball") == pytest.approx(2 / 3)
    assert token_accuracy("a red", "a red ball") == pytest.approx(2 / 3)
