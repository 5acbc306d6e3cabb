"""Multiple choice (AI2D, ScienceQA, MMBench): the option letter in a free-form answer.

The prompt lists the options as "A. text" lines and asks for the letter (prompts.py). The letter is
read from the answer, first rule that applies:

1. the whole answer is one letter, optionally with brackets or a period: "B", "(B)", "B.", "B)";
2. the answer starts with such a letter followed by a separator: "B. Paris", "(B) Paris", "B: Paris";
3. "answer is B" / "Answer: B" / "option B" anywhere (case-insensitive keyword, capital letter);
4. exactly one option's text occurs in the answer (case-insensitive): that option;
otherwise no letter (counted wrong). Letters beyond the number of options are ignored.

    extract_letter("The answer is (C).", ["cat", "dog", "cow"]) -> "C"
    extract_letter("dog", ["cat", "dog", "cow"]) -> "B"
Score: 1.0 when the letter is the correct one.
"""

from __future__ import annotations

import re
import string
from typing import Sequence

LETTERS = string.ascii_uppercase


def _letters(n: int) -> str:
    return LETTERS[:n]


def extract_letter(prediction: str, choices: Sequence[str]) -> str | None:
    allowed = _letters(len(choices))
    if not allowed:
        return None
    text = prediction.strip()
    bare = re.fullmatch(rf"[\(\[]?([{allowed}])[\)\]]?\.?", text)
    if bare:
        return bare.group(1)
    lead = re.match(rf"[\(\[]?([{allowed}])(?:[\)\]][\s.:,]*|[.:,]\s*|\s+)", text)
    if lead:
        return lead.group(1)
    said = re.search(rf"(?i:answer\s*(?:is|:)?|option|choice)\s*:?\s*[\(\[]?([{allowed}])\b", text)
    if said:
        return said.group(1)
    lowered = text.lower()
    found = [LETTERS[i] for i, c in enumerate(choices) if c.strip() and c.strip().lower() in lowered]
    return found[0] if len(found) == 1 else None


def answer_letter(answer: str, choices: Sequence[str]) -> str:
    """The correct option as a letter: the answer given as a letter, or as an option's text."""
    a = answer.strip()
    if len(a) == 1 and a.upper() in _letters(len(choices)):
        return a.upper()
    for i, c in enumerate(choices):
        if c.strip().lower() == a.lower():
            return LETTERS[i]
    raise ValueError(f"answer {answer!r} is neither an option letter nor one of the options {list(choices)}")


def choice_accuracy(answers: Sequence[str], prediction: str, choices: Sequence[str]) -> float:
    letter = extract_letter(prediction, choices)
    return float(letter is not None and any(letter == answer_letter(a, choices) for a in answers))
