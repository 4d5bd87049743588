"""Caption and VQA metrics.

- Per caption: exact match and position-wise word accuracy (the demo's side-by-side scores).
- Corpus captioning metrics, the COCO caption suite as papers report it: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D
  from `pycocoevalcap` (the reference implementation), over the Stanford PTB tokenizer. The tokenizer and
  METEOR run on Java; without Java, BLEU, ROUGE-L and CIDEr-D are computed over `simple_tokenize` instead
  (lower case, punctuation removed, as the PTB step does for these captions), METEOR is left out, and the
  result says so. SPICE needs Stanford CoreNLP models that cannot be downloaded here: always left out, noted.
- VQA: the VQAv2 accuracy (answers normalised as the official evaluation does; min(#humans who gave the
  answer / 3, 1), averaged over the ten leave-one-out subsets of the ten human answers), and exact match.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from collections.abc import Mapping, Sequence

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


# ---------------------------------------------------------------------------------------------------- captions

CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


def java_available() -> bool:
    return shutil.which("java") is not None


def simple_tokenize(text: str) -> str:
    """The fallback tokenizer: lower case, words and numbers only, single spaces."""
    return " ".join(words(text))


def caption_scores(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], use_java: bool | None = None
) -> dict:
    """COCO caption metrics of `predictions` (id -> caption) against `references` (id -> captions).

    Returns {"scores": {metric: value}, "tokenizer": ..., "notes": [...]}; metrics that could not run are absent.
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        raise ImportError("captioning metrics need pycocoevalcap: pip install 'vlmtune[eval]'") from None

    ids = sorted(predictions)
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(f"no reference caption for {len(missing)} prediction(s), e.g. {missing[0]!r}")
    use_java = java_available() if use_java is None else use_java
    notes = ["SPICE left out: it needs Stanford CoreNLP models, which are not available offline."]
    scorers: list[tuple[object, tuple[str, ...]]] = [
        (Bleu(4), CAPTION_METRICS[:4]),
        (Rouge(), ("ROUGE-L",)),
        (Cider(), ("CIDEr-D",)),  # pycocoevalcap's Cider is the CIDEr-D of the COCO evaluation server
    ]
    # The scorers print progress to stdout; a CLI that may print JSON there keeps it clean.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if use_java:
            from pycocoevalcap.meteor.meteor import Meteor
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

            tok = PTBTokenizer()
            gts = tok.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
            res = tok.tokenize({i: [{"caption": predictions[i]}] for i in ids})
            scorers.insert(1, (Meteor(), ("METEOR",)))
            tokenizer = "PTBTokenizer (Stanford CoreNLP 3.4.1, via pycocoevalcap)"
        else:
            gts = {i: [simple_tokenize(c) for c in references[i]] for i in ids}
            res = {i: [simple_tokenize(predictions[i])] for i in ids}
            tokenizer = "simple_tokenize (no Java: lower case, punctuation removed)"
            notes.append("Java not found: METEOR left out, and captions tokenized without the PTB tokenizer.")
        scores: dict[str, float] = {}
        for scorer, names in scorers:
            value, _ = scorer.compute_score(gts, res)
            values = value if isinstance(value, list) else [value]
            scores.update({n: float(v) for n, v in zip(names, values, strict=True)})
    return {
        "scores": {m: scores[m] for m in CAPTION_METRICS if m in scores},
        "tokenizer": tokenizer,
        "notes": notes,
        "images": len(ids),
    }


# -------------------------------------------------------------------------------------------------------- VQA
# From the official VQA evaluation (vqaEval.py): its contraction table (the common entries), number words,
# articles and punctuation rules.
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "shant": "shan't",
    "shed": "she'd",
    "shes": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "somebodys": "somebody's",
    "someones": "someone's",
    "thats": "that's",
    "thered": "there'd",
    "theres": "there's",
    "theyd": "they'd",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "wasnt": "wasn't",
    "wed": "wed",
    "werent": "weren't",
    "whatre": "what're",
    "whats": "what's",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whod": "who'd",
    "wholl": "who'll",
    "whos": "who's",
    "whyre": "why're",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "yall": "y'all",
    "youd": "you'd",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    kept = [_NUMBERS.get(w, w) for w in text.lower().split() if _NUMBERS.get(w, w) not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in kept)


def normalize_answer(answer: str) -> str:
    """An answer as the VQA evaluation compares it: 'Two dogs.' -> '2 dogs', 'the beach' -> 'beach'."""
    return _digits_articles(_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against the human answers (usually ten).

    Faithful to the official code, quirk included: answers (and the prediction) are normalised only when the
    humans disagree, so 'two' scores 0 against ten '2's (VQAv2's answers are already normalised).
    """
    answers = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    pred = prediction.replace("\n", " ").replace("\t", " ").strip()
    if len(set(answers)) > 1:  # as the official code: normalise only when the humans disagree
        answers = [normalize_answer(a) for a in answers]
        pred = normalize_answer(pred)
    accs = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1 :]
        accs.append(min(1.0, sum(a == pred for a in others) / 3))
    return sum(accs) / len(accs)


def vqa_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean VQA accuracy and exact match (against the most common normalised answer)."""
    from collections import Counter

    acc = [vqa_accuracy(p, a) for p, a in zip(predictions, answers, strict=True)]
    exact = [
        float(normalize_answer(p) == Counter(normalize_answer(x) for x in a).most_common(1)[0][0])
        for p, a in zip(predictions, answers, strict=True)
    ]
    return {"VQA accuracy": sum(acc) / len(acc), "exact match": sum(exact) / len(exact)}
