"""The eval metrics against hand-worked examples from their published definitions (phi3v.eval.metrics)."""

from __future__ import annotations

import pytest

from phi3v.eval.metrics import Score, agreement_key, score
from phi3v.eval.metrics.anls import anls, similarity
from phi3v.eval.metrics.choice import answer_letter, choice_accuracy, extract_letter
from phi3v.eval.metrics.edit_distance import cer, levenshtein, wer
from phi3v.eval.metrics.exact import exact_match
from phi3v.eval.metrics.relaxed import relaxed_accuracy, relaxed_correct
from phi3v.eval.metrics.vqa import normalise_answer, vqa_accuracy


# -- edit distance, CER, WER ------------------------------------------------------------------

def test_levenshtein_textbook_examples():
    assert levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert levenshtein("flaw", "lawn") == 2  # -f, +n
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3
    assert levenshtein(["the", "cat"], ["the", "hat"]) == 1  # word lists work too


def test_cer_and_wer_divide_by_the_reference():
    assert cer("hello world", "helo world") == pytest.approx(1 / 11)
    assert cer("hello\nworld", "hello   world") == 0.0  # whitespace runs collapse
    assert cer("Total", "total") == pytest.approx(1 / 5)  # case counts
    assert wer("the cat sat", "the cat sit") == pytest.approx(1 / 3)
    assert wer("a b", "a b c d e") == pytest.approx(3 / 2)  # insertions can pass 1
    assert cer("", "") == 0.0 and cer("", "x") == 1.0


def test_cer_score_is_one_minus_the_best_rate():
    s = score("cer", ["abcd", "abcx"], "abcx")
    assert s == Score(1.0, 0.0)
    s = score("wer", ["one two three four"], "one two")
    assert s.value == pytest.approx(0.5) and s.score == pytest.approx(0.5)
    assert score("wer", ["a"], "b c d").score == 0.0  # clipped at 0


# -- ChartQA relaxed accuracy -----------------------------------------------------------------

@pytest.mark.parametrize("target,prediction,expected", [
    ("100", "104", True),  # 4% off
    ("100", "105", True),  # exactly 5%
    ("100", "106", False),
    ("-20", "-19.5", True),  # relative to |target|
    ("45%", "0.46", True),  # 0.45 vs 0.46
    ("0.45", "45%", True),
    ("0", "0.01", False),  # target 0: no tolerance, text compare
    ("0", "0", True),
    ("Yes", " yes ", True),
    ("Apples", "apple", False),
    ("1,000", "1000", False),  # the published script reads no thousands separators
])
def test_relaxed_correctness(target, prediction, expected):
    assert relaxed_correct(target, prediction) is expected


def test_relaxed_accuracy_takes_the_best_answer():
    assert relaxed_accuracy(["24", "24%"], "0.24") == 1.0
    assert relaxed_accuracy(["24"], "30") == 0.0


# -- ANLS -------------------------------------------------------------------------------------

def test_anls_worked_examples():
    assert similarity("hello", "helo") == pytest.approx(0.8)  # 1 edit / 5
    assert similarity("abcd", "ab") == 0.0  # NL = 0.5 is not < 0.5
    assert similarity("abcde", "abc") == pytest.approx(0.6)  # NL = 0.4
    assert similarity("Total", "  total ") == 1.0  # case and outer spaces normalised
    assert similarity("New  York", "new york") == 1.0
    assert anls(["hello", "hallo world"], "hallo") == pytest.approx(0.8)  # the best answer counts
    assert anls(["x"], "completely different") == 0.0


# -- VQA accuracy -----------------------------------------------------------------------------

@pytest.mark.parametrize("matches,expected", [(10, 1.0), (4, 1.0), (3, 0.9), (2, 0.6), (1, 0.3), (0, 0.0)])
def test_vqa_accuracy_leave_one_out(matches, expected):
    humans = ["red"] * matches + ["blue"] * (10 - matches)
    assert vqa_accuracy(humans, "red") == pytest.approx(expected)


@pytest.mark.parametrize("raw,normalised", [
    ("Two", "2"),
    ("the dog.", "dog"),
    ("a cat", "cat"),
    ("dont", "don't"),
    ("yes!", "yes"),
    ("1,000", "1000"),  # a comma between digits: punctuation deleted, not spaced
    ("3.5", "3.5"),  # a period before a digit stays
    ("red-orange", "red orange"),  # not touching a space: becomes a space
    ("red - orange", "red orange"),  # touching a space: deleted
    ("  none\n", "0"),
])
def test_vqa_normalisation(raw, normalised):
    assert normalise_answer(raw) == normalised


def test_vqa_accuracy_normalises_both_sides():
    assert vqa_accuracy(["two"] * 3 + ["three"] * 7, "2") == pytest.approx(0.9)
    assert vqa_accuracy(["2"], "Two.") == 1.0  # one answer: compared directly
    assert vqa_accuracy(["2"], "3") == 0.0


# -- multiple choice --------------------------------------------------------------------------

CHOICES = ["cat", "dog", "cow"]


@pytest.mark.parametrize("answer,letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B) dog", "B"), ("C: cow", "C"), ("A cat", "A"),
    ("The answer is (C).", "C"), ("Answer: A", "A"), ("I pick option B", "B"),
    ("It is a dog.", "B"),  # one option's text
    ("a cat or a dog", None),  # two options' text: no letter
    ("D", None),  # beyond the options
    ("", None),
])
def test_extract_letter(answer, letter):
    assert extract_letter(answer, CHOICES) == letter


def test_choice_accuracy_accepts_letters_or_option_text():
    assert answer_letter("b", CHOICES) == "B" and answer_letter("cow", CHOICES) == "C"
    assert choice_accuracy(["B"], "(B) dog", CHOICES) == 1.0
    assert choice_accuracy(["dog"], "B", CHOICES) == 1.0
    assert choice_accuracy(["A"], "B", CHOICES) == 0.0
    with pytest.raises(ValueError, match="neither an option letter"):
        answer_letter("horse", CHOICES)


# -- exact, dispatch, agreement ---------------------------------------------------------------

def test_exact_match_and_dispatch():
    assert exact_match(["Blue"], "blue.") == 1.0 and exact_match(["blue"], "dark blue") == 0.0
    assert score("relaxed", ["100"], "103") == Score(1.0, 1.0)
    assert score("anls", ["hello"], "helo").score == pytest.approx(0.8)
    assert score("choice", ["A"], "A", CHOICES).score == 1.0
    assert score("exact", ["x"], None).score == 0.0  # no text: scored as empty
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", ["x"], "x")
    with pytest.raises(ValueError, match="at least one"):
        score("exact", [], "x")


def test_agreement_keys():
    assert agreement_key("choice", "(B)", CHOICES) == agreement_key("choice", "It is a dog", CHOICES)
    assert agreement_key("vqa", "Two", ()) == agreement_key("vqa", "2", ())
    assert agreement_key("anls", " Oak  Street", ()) == agreement_key("anls", "oak street", ())
    assert agreement_key("anls", "oak", ()) != agreement_key("anls", "oak street", ())
