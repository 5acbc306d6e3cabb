"""VQA accuracy (Antol et al. 2015; the VQAv2 and TextVQA metric) with the official answer
normalisation.

An answer is fully correct when at least 3 of the 10 human annotators gave it. To smooth over
annotator choice the official evaluation averages over the 10 ways of leaving one annotator out:

    acc(p) = mean over i in 1..10 of  min(1, #{j != i : human_j == p} / 3)

    4 of 10 humans said p:  each left-out set has 3 or 4 matches -> 1.0
    3 of 10:  7 sets keep all 3 (1.0), 3 sets keep 2 (2/3)       -> (7 + 3 * 2/3) / 10 = 0.9
    2 of 10:  8 sets keep 2 (2/3), 2 sets keep 1 (1/3)           -> (8*2/3 + 2*1/3) / 10 = 0.6
    1 of 10:  9 sets keep 1 (1/3), 1 set keeps 0                 -> 0.3

With fewer than 10 answers the same leave-one-out average is taken over the answers given; a
single answer (nothing left once it is left out) is compared directly: 1.0 or 0.0.

Normalisation (applied to the prediction and to every human answer; the official script applies it
to the human answers only when they are not all identical, which gives the same result on the
published annotations, already normalised):
1. newlines and tabs become spaces; surrounding whitespace is stripped;
2. punctuation: each of ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted when it touches a
   space or the text has a comma between digits ("1,000"), else replaced by a space; a period not
   followed by a digit is deleted ("3.5" keeps its period);
3. lowercase; the words a, an, the are dropped; number words zero..ten become digits; common
   contractions written without an apostrophe get it back ("dont" -> "don't").
"""

from __future__ import annotations

import re
from typing import Sequence

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
# Contractions people (and models) write without the apostrophe -> the annotators' spelling.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id": "I'd", "id": "I'd", "Im": "I'm", "im": "I'm", "Ive": "I've", "ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itll": "it'll", "lets": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "shant": "shan't", "shed": "she'd", "shes": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "somebodys": "somebody's", "someones": "someone's",
    "somethings": "something's", "thats": "that's", "thered": "there'd", "theres": "there's",
    "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}


def _punctuation(text: str) -> str:
    out = text
    comma_number = _COMMA_IN_NUMBER.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or comma_number:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _digits_and_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalise_answer(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_punctuation(text))


def vqa_accuracy(answers: Sequence[str], prediction: str) -> float:
    humans = [normalise_answer(a) for a in answers]
    p = normalise_answer(prediction)
    if len(humans) == 1:
        return float(humans[0] == p)
    matches = sum(h == p for h in humans)
    # Leaving out annotator i removes one match when annotator i gave p.
    total = sum(min(1.0, (matches - (h == p)) / 3.0) for h in humans)
    return total / len(humans)
