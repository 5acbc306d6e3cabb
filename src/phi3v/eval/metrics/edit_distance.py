"""Levenshtein distance and the error rates built on it: CER (characters) and WER (words).

    levenshtein("kitten", "sitting") == 3      # substitute k->s, e->i, insert g
    cer("hello world", "helo world") == 1/11   # one deletion over 11 reference characters
    wer("the cat sat", "the cat sit") == 1/3   # one substituted word over 3 reference words

Error rate = (substitutions + deletions + insertions) / length of the REFERENCE, the usual
definition; it can exceed 1 when the prediction is much longer than the reference. Normalisation:
leading/trailing whitespace stripped and runs of whitespace collapsed to one space (so a line break
against a space is no error); case and punctuation count. An empty reference scores 0 against an
empty prediction and 1 against anything else.
"""

from __future__ import annotations

from typing import Sequence


def levenshtein(a: Sequence, b: Sequence) -> int:
    """Edits (insert, delete, substitute; cost 1 each) turning `a` into `b`; strings or word lists.

    One row of the dynamic-programming table at a time: O(len(a) * len(b)) time, O(len(b)) memory.
    """
    if len(a) < len(b):
        a, b = b, a  # the shorter one indexes the row
    previous = list(range(len(b) + 1))  # distance from a[:0] to b[:j]
    for i, x in enumerate(a, start=1):
        current = [i]  # a[:i] -> b[:0]: i deletions
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1,  # delete x
                               current[j - 1] + 1,  # insert y
                               previous[j - 1] + (x != y)))  # substitute (free when equal)
        previous = current
    return previous[-1]


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _rate(reference: Sequence, prediction: Sequence) -> float:
    if not reference:
        return 0.0 if not prediction else 1.0
    return levenshtein(reference, prediction) / len(reference)


def cer(reference: str, prediction: str) -> float:
    """Character error rate of `prediction` against `reference` (whitespace collapsed)."""
    return _rate(_collapse(reference), _collapse(prediction))


def wer(reference: str, prediction: str) -> float:
    """Word error rate: the same over whitespace-separated words."""
    return _rate(reference.split(), prediction.split())


def best_cer(references: Sequence[str], prediction: str) -> float:
    """The lowest CER over the accepted transcriptions."""
    return min(cer(r, prediction) for r in references)


def best_wer(references: Sequence[str], prediction: str) -> float:
    return min(wer(r, prediction) for r in references)
