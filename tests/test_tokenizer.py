"""phi3v.engine.tokenizer against the reference ids and texts (spec §8.2-§8.6, golden model cases).

The tokenizer is the real Phi-3-vision tokenizer.json (bundled in src/phi3v/assets/tokenizer, the same
files as the golden tiny models). Golden cases come from tests/golden or $PHI3V_GOLDEN_DIR.
"""

from __future__ import annotations

import json
import pathlib
import random

import pytest

from golden_cases import golden_dir, load_cases, load_index
from phi3v.errors import CheckpointError
from phi3v.engine.tokenizer import Tokenizer

ASSET_DIR = pathlib.Path(__file__).resolve().parent.parent / "src" / "phi3v" / "assets" / "tokenizer"
MODEL_CASES = load_cases("model_cases")
FFFD = "\ufffd"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(ASSET_DIR)


def _case_meta(case):
    with open(golden_dir() / case["path"] / "meta.json", encoding="utf-8") as f:
        return json.load(f)


def _case_tokenizer(case) -> Tokenizer:
    return Tokenizer.from_dir(golden_dir() / "models" / case["model"])


def _stream(tok, ids, **kw):
    dec = tok.incremental(**kw)
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert dec.text == "".join(deltas)
    return deltas


# --- ids and loading ---------------------------------------------------------------------------


def test_special_ids_read_from_the_tokenizer(tok):
    assert (tok.bos_id, tok.end_id, tok.endoftext_id) == (1, 32007, 32000)
    assert tok.stop_ids == frozenset({32007, 32000})
    assert tok.vocab_size == 32045  # 32000 base + 45 added tokens; the model has 32064 rows
    # removed by skip_special_tokens: <unk>, <s> and 32000..32044, but not </s> (id 2)
    assert tok.special_ids == frozenset({0, 1, *range(32000, 32045)})


def test_from_dir_without_tokenizer_json_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_from_file_with_a_broken_file_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read tokenizer"):
        Tokenizer.from_file(bad)


# --- encode (spec §8.2, §8.5) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, ids",
    [
        ("<|user|>\n", [1, 32010, 29871, 13]),  # every segment gets its own "▁"
        ("<|assistant|>\nThey", [1, 32001, 2688]),  # <|assistant|> rstrip eats the newline
        (
            "<|user|>\nWhat is 1+1?<|end|>\n<|assistant|>\n",
            [1, 32010, 29871, 13, 5618, 338, 29871, 29896, 29974, 29896, 29973, 32007, 29871, 13, 32001],
        ),
        ("Describe", [1, 20355, 915]),
        ("", [1]),  # an empty chunk is just BOS
    ],
)
def test_encode_reference_ids(tok, text, ids):
    assert tok.encode(text) == ids


def test_encode_matches_the_golden_tokenizer_checks(tok):
    # "got" is what the reference tokenizer produced for these published strings
    checks = load_index().get("tokenizer_checks", [])
    assert checks, "the golden set lists tokenizer checks"
    for check in checks:
        assert tok.encode(check["text"]) == check["got"], check["text"]


# --- decode (spec §8.6) -------------------------------------------------------------------------


def test_decode_strips_one_leading_space_and_skips_special_tokens(tok):
    the = tok.encode("The image")[1:]  # [▁The, ▁image]
    assert tok.decode(the) == "The image"
    assert tok.decode([32007, *the, 32000]) == "The image"
    assert tok.decode([*the, 32007], skip_special_tokens=False) == "The image<|end|>"
    # "▁▁" then "▁A" is three spaces before A: only one is stripped
    assert tok.decode([259, *tok.encode("A")[1:]]) == "  A"


def test_decode_keeps_end_of_sequence_s_like_the_reference(tok):
    ids = tok.encode("The image")[1:] + [2]
    assert tok.decode(ids) == "The image</s>"


def test_decode_drops_placeholders_and_ids_without_token(tok):
    a = tok.encode("A")[1:]
    assert tok.decode([-1, -1, *a, 32050, 32063]) == "A"


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c["case_id"] for c in MODEL_CASES])
def test_decode_golden_generated_text(case):
    meta = _case_meta(case)
    tok = _case_tokenizer(case)
    assert tok.decode(meta["gen_ids"]) == meta["gen_text"]
    assert tok.decode(meta["gen_ids"], skip_special_tokens=False) == meta["gen_text_with_special"]


# --- incremental decoding -----------------------------------------------------------------------


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c["case_id"] for c in MODEL_CASES])
def test_incremental_golden_generated_text(case):
    meta = _case_meta(case)
    tok = _case_tokenizer(case)
    assert "".join(_stream(tok, meta["gen_ids"])) == meta["gen_text"]
    assert "".join(_stream(tok, meta["gen_ids"], skip_special_tokens=False)) == meta["gen_text_with_special"]


MULTIBYTE_TEXTS = [
    "héllo 😀 漢字 ok",
    "😀😀 x🦜",  # emoji only spelled with byte-fallback tokens, back to back
    "Ωμέγα 한국어 텍스트 🇺🇸 👩‍👩‍👧",  # Greek, Hangul (some byte fallback), flags, ZWJ sequence
    "  two leading spaces\n\nand newlines 🎉",
    "中文字符和日本語のテキスト。",
]


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_incremental_multibyte_equals_decode_and_never_yields_partial_characters(tok, text):
    ids = tok.encode(text)[1:]
    deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)
    assert all(FFFD not in d for d in deltas), deltas


def test_incremental_holds_back_until_the_last_byte_of_a_character(tok):
    ids = tok.encode("a😀")[1:]
    byte_ids = [i for i in ids if tok.is_byte_token(i)]
    assert len(byte_ids) == 4  # F0 9F 98 80: the test exercises byte fallback
    dec = tok.incremental()
    assert dec.push(ids[0]) == "a"
    assert [dec.push(i) for i in byte_ids] == ["", "", "", "😀"]
    assert dec.flush() == ""


def test_incremental_flush_returns_incomplete_bytes_like_decode(tok):
    f0, x9f = tok.token_to_id("<0xF0>"), tok.token_to_id("<0x9F>")
    ids = [*tok.encode("ok")[1:], f0, x9f]
    dec = tok.incremental()
    assert "".join(dec.push(i) for i in ids) == "ok"
    assert dec.flush() == FFFD * 2
    assert dec.text == tok.decode(ids) == "ok" + FFFD * 2


def test_incremental_special_tokens_and_leading_space(tok):
    ids = [32007, 29871, *tok.encode("The end")[1:], 32007, 32000]
    deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == " The end"  # "▁" + "▁The": one space stripped
    assert "".join(_stream(tok, ids, skip_special_tokens=False)) == tok.decode(ids, skip_special_tokens=False)


def test_incremental_random_ids_match_decode():
    # Random ids, heavy on byte-fallback tokens, newlines, "▁", </s> and <|end|>. Deltas must equal
    # decode() exactly whenever decode() has no U+FFFD; with invalid UTF-8 they may differ only where
    # decode() shows U+FFFD (documented: a byte run made invalid after its valid start was emitted).
    tok = Tokenizer.from_dir(ASSET_DIR)
    rng = random.Random(1234)
    pool = [lambda: rng.randrange(3, 259), lambda: rng.randrange(0, 32064), lambda: 29871, lambda: 13,
            lambda: 2, lambda: 32007]
    exact = 0
    for _ in range(1500):
        ids = [rng.choice(pool)() for _ in range(rng.randint(1, 12))]
        streamed, full = "".join(_stream(tok, ids)), tok.decode(ids)
        if FFFD not in full:
            assert streamed == full, ids
            exact += 1
        else:
            assert len(streamed) == len(full), ids
            assert all(a == b or b == FFFD for a, b in zip(streamed, full)), ids
    assert exact > 500  # most samples check exact equality
