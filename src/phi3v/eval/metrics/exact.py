"""Exact match after light normalisation: case, surrounding whitespace and punctuation, inner
whitespace runs collapsed. "Blue." == "blue"; "dark blue" != "blue".
"""

from __future__ import annotations

import string
from typing import Sequence

_STRIP = string.whitespace + string.punctuation


def normalise(text: str) -> str:
    return " ".join(text.strip(_STRIP).lower().split())


def exact_match(answers: Sequence[str], prediction: str) -> float:
    p = normalise(prediction)
    return float(any(normalise(a) == p for a in answers))
