"""ANLS, Average Normalized Levenshtein Similarity (Biten et al. 2019, ST-VQA; the DocVQA and
InfographicVQA metric), threshold tau = 0.5.

For one question with accepted answers a_1..a_n and prediction p (both normalised: lowercase,
surrounding whitespace stripped, inner whitespace runs collapsed):

    NL(a, p) = levenshtein(a, p) / max(len(a), len(p))
    s(a, p)  = 1 - NL(a, p)   if NL(a, p) < tau   else 0
    score    = max over i of s(a_i, p)

ANLS of a data set is the mean score over its questions.

    anls(["hello"], "helo")  -> 0.8    # 1 edit / 5 characters
    anls(["abcd"], "ab")     -> 0.0    # NL = 2/4 = 0.5, not < 0.5
    anls(["Total"], " total ") -> 1.0
"""

from __future__ import annotations

from typing import Sequence

from .edit_distance import levenshtein

THRESHOLD = 0.5


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def similarity(answer: str, prediction: str, threshold: float = THRESHOLD) -> float:
    a, p = _normalise(answer), _normalise(prediction)
    if not a and not p:
        return 1.0
    nl = levenshtein(a, p) / max(len(a), len(p))
    return 1.0 - nl if nl < threshold else 0.0


def anls(answers: Sequence[str], prediction: str, threshold: float = THRESHOLD) -> float:
    return max(similarity(a, prediction, threshold) for a in answers)
