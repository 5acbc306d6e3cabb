"""The metrics `phi3v eval` scores answers with, by name; one module per metric family.

    relaxed  ChartQA relaxed accuracy, 5% numeric tolerance          relaxed.py
    anls     DocVQA / InfographicVQA ANLS, threshold 0.5             anls.py
    vqa      VQAv2 / TextVQA accuracy over (up to) 10 human answers   vqa.py
    choice   multiple choice (AI2D, ScienceQA, MMBench): option letter choice.py
    cer, wer OCR transcription: character / word error rate          edit_distance.py
    exact    normalised exact match                                  exact.py

score(metric, answers, prediction, choices) -> Score(score, value): `score` is in [0, 1], higher
better, the number accuracy and agreement are averaged from; `value` is the metric's own number
(equal to score except for cer / wer, where it is the error rate and score = max(0, 1 - rate)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .anls import anls
from .choice import choice_accuracy
from .edit_distance import best_cer, best_wer
from .exact import exact_match
from .relaxed import relaxed_accuracy
from .vqa import vqa_accuracy

METRICS = ("relaxed", "anls", "vqa", "choice", "cer", "wer", "exact")
LOWER_IS_BETTER = frozenset({"cer", "wer"})
# How each metric's mean is labelled in reports.
LABELS = {"relaxed": "relaxed acc", "anls": "ANLS", "vqa": "VQA acc", "choice": "choice acc",
          "cer": "CER", "wer": "WER", "exact": "exact match"}


@dataclass(frozen=True)
class Score:
    score: float  # [0, 1], higher is better
    value: float  # the metric's own number (an error rate for cer / wer)


def check_metric(name: str) -> str:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    return name


def score(metric: str, answers: Sequence[str], prediction: str, choices: Sequence[str] = ()) -> Score:
    check_metric(metric)
    if not answers:
        raise ValueError("a record needs at least one accepted answer")
    prediction = prediction or ""
    if metric == "cer" or metric == "wer":
        rate = (best_cer if metric == "cer" else best_wer)(answers, prediction)
        return Score(max(0.0, 1.0 - rate), rate)
    if metric == "choice":
        value = choice_accuracy(answers, prediction, choices)
    elif metric == "relaxed":
        value = relaxed_accuracy(answers, prediction)
    elif metric == "anls":
        value = anls(answers, prediction)
    elif metric == "vqa":
        value = vqa_accuracy(answers, prediction)
    else:
        value = exact_match(answers, prediction)
    return Score(value, value)


def agreement_key(metric: str, prediction: str, choices: Sequence[str] = ()) -> str:
    """What two variants must share to 'give the same answer': the extracted letter for choice,
    the VQA-normalised text for vqa, else the text lowercased with whitespace collapsed."""
    prediction = prediction or ""
    if metric == "choice":
        from .choice import extract_letter

        return extract_letter(prediction, choices) or " ".join(prediction.lower().split())
    if metric == "vqa":
        from .vqa import normalise_answer

        return normalise_answer(prediction)
    return " ".join(prediction.strip().lower().split())
