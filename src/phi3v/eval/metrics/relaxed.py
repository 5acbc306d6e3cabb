"""ChartQA's relaxed accuracy (Masry et al. 2022, the metric of the ChartQA paper and of Pix2Struct /
MatCha's evaluation): an answer is correct when

- both the target and the prediction read as numbers and the prediction is within 5% of the target
  (|prediction - target| / |target| <= 0.05); a trailing "%" divides by 100 ("45%" is 0.45);
- otherwise (text answers, or a target of 0, which has no relative tolerance) when the two strings
  are equal ignoring case.

    relaxed_correct("100", "104") -> True     # 4% off
    relaxed_correct("100", "106") -> False    # 6% off
    relaxed_correct("45%", "0.46") -> True    # 0.45 vs 0.46: 2.2% off
    relaxed_correct("Yes", "yes") -> True

Both strings are stripped of surrounding whitespace first and, as in the published script, nothing
else: "1,000" is not a number and "12 dollars" is text. With several accepted answers the best counts.
"""

from __future__ import annotations

from typing import Sequence

TOLERANCE = 0.05


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correct(target: str, prediction: str, tolerance: float = TOLERANCE) -> bool:
    target, prediction = target.strip(), prediction.strip()
    t, p = _to_float(target), _to_float(prediction)
    if p is not None and t:  # t == 0 (or not a number): no relative tolerance, compare the text
        return abs(p - t) / abs(t) <= tolerance
    return prediction.lower() == target.lower()


def relaxed_accuracy(targets: Sequence[str], prediction: str) -> float:
    """1.0 if the prediction is relaxed-correct for any accepted answer, else 0.0."""
    return float(any(relaxed_correct(t, prediction) for t in targets))
