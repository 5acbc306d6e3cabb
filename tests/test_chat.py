"""phi3v.engine.chat_template: message rendering (spec §8.1) and input ids with image runs (spec §8.4, §8.5).

Worked examples use small fake image token counts (T = 5, 3) so runs are easy to read; the golden
model cases check real counts against the reference processor's input_ids.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from golden_cases import golden_dir, load_cases
from phi3v.engine.chat_template import build_input_ids, check_image_tags, render_messages, render_prompt
from phi3v.errors import PromptError
from phi3v.engine.tokenizer import Tokenizer

ASSET_DIR = pathlib.Path(__file__).resolve().parent.parent / "src" / "phi3v" / "assets" / "tokenizer"
MODEL_CASES = load_cases("model_cases")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(ASSET_DIR)


def _case_meta(case):
    with open(golden_dir() / case["path"] / "meta.json", encoding="utf-8") as f:
        return json.load(f)


# --- spec §8.5 worked examples ------------------------------------------------------------------


def test_one_image_worked_example(tok):
    prompt = "<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n"
    ids = build_input_ids(tok, prompt, [5])
    assert ids == [1, 32010, 29871, 13] + [-1] * 5 + [
        1, 29871, 13, 5618, 338, 4318, 297, 445, 1967, 29973, 32007, 29871, 13, 32001
    ]
    assert len(build_input_ids(tok, prompt, [757])) == 775  # the spec's length for T = 757


def test_system_two_images_and_history_worked_example(tok):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "image", "image": "second.png"},
            {"type": "text", "text": "Compare."},
        ]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": "How?"},
    ]
    prompt, images = render_messages(messages)
    assert prompt == (
        "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\n<|image_1|>\n<|image_2|>\nCompare.<|end|>\n"
        "<|assistant|>\nThey differ.<|end|>\n<|user|>\nHow?<|end|>\n<|assistant|>\n"
    )
    assert images == ["data:image/png;base64,AAAA", "second.png"]
    ids = build_input_ids(tok, prompt, [5, 3])
    assert ids == (
        [1, 32006, 29871, 13, 3492, 526, 263, 8444, 20255, 29889, 32007, 29871, 13, 32010, 29871, 13]
        + [-1] * 5 + [1, 29871, 13] + [-2] * 3
        + [1, 29871, 13, 6843, 598, 29889, 32007, 29871, 13, 32001, 2688, 1163, 29889, 32007, 29871, 13,
           32010, 29871, 13, 5328, 29973, 32007, 29871, 13, 32001]
    )
    assert len(build_input_ids(tok, prompt, [757, 457])) == 1258  # the spec's length


def test_text_only_worked_example_has_one_bos(tok):
    prompt = "<|user|>\nWhat is 1+1?<|end|>\n<|assistant|>\n"
    assert build_input_ids(tok, prompt, []) == [
        1, 32010, 29871, 13, 5618, 338, 29871, 29896, 29974, 29896, 29973, 32007, 29871, 13, 32001
    ]


def test_tag_at_the_very_start(tok):
    assert build_input_ids(tok, "<|image_1|>Describe", [5]) == [1] + [-1] * 5 + [1, 20355, 915]


def test_out_of_order_tags_get_their_own_image_counts(tok):
    # run of -k has image k's length wherever tag k is; the model writes image k over the -k run
    ids = build_input_ids(tok, "<|image_2|>A<|image_1|>", [3, 5])
    a = tok.encode("A")
    assert ids == [1] + [-2] * 5 + a + [-1] * 3 + [1]


# --- golden model cases -------------------------------------------------------------------------


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c["case_id"] for c in MODEL_CASES])
def test_golden_input_ids(case):
    meta = _case_meta(case)
    tok = Tokenizer.from_dir(golden_dir() / "models" / case["model"])
    expected = np.load(golden_dir() / case["path"] / "arrays.npz")["input_ids"][0].tolist()
    ids = build_input_ids(tok, meta["prompt"], meta["num_img_tokens"])
    assert len(ids) == meta["prompt_len"]
    assert ids == expected


CASES_WITH_MESSAGES = [c for c in MODEL_CASES if _case_meta(c).get("messages")]


@pytest.mark.parametrize("case", CASES_WITH_MESSAGES, ids=[c["case_id"] for c in CASES_WITH_MESSAGES])
def test_golden_messages_render_to_the_prompt(case):
    meta = _case_meta(case)
    prompt, images = render_messages(meta["messages"])
    assert prompt == meta["prompt"]
    assert images == []  # tags are in the text; the images are passed separately


def test_model_card_multi_image_prompt_verbatim(tok):
    # m03's prompt is the model card's, a space after the tags' newline included
    prompt = render_prompt("<|image_1|>\n<|image_2|>\n What is difference in this two images?", 2)
    assert prompt == "<|user|>\n<|image_1|>\n<|image_2|>\n What is difference in this two images?<|end|>\n<|assistant|>\n"


# --- render_messages ----------------------------------------------------------------------------


def test_images_numbered_across_the_conversation():
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": "a.png"}, {"type": "text", "text": "One."}]},
        {"role": "assistant", "content": "Ok."},
        {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "image", "image": b"png"},
                                     {"type": "text", "text": "this?"}]},
    ]
    prompt, images = render_messages(messages)
    assert prompt == (
        "<|user|>\n<|image_1|>\nOne.<|end|>\n<|assistant|>\nOk.<|end|>\n"
        "<|user|>\n<|image_2|>\nAnd\nthis?<|end|>\n<|assistant|>\n"  # images first; text parts joined by \n
    )
    assert images == ["a.png", b"png"]


def test_generation_prompt_only_when_asked_and_not_after_assistant():
    user = {"role": "user", "content": "Hi"}
    assert render_messages([user], add_generation_prompt=False)[0] == "<|user|>\nHi<|end|>\n"
    last_assistant = [user, {"role": "assistant", "content": "Hello"}]
    assert render_messages(last_assistant)[0] == "<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n"


def test_result_has_named_fields():
    r = render_messages([{"role": "user", "content": [{"type": "image", "image": "x.png"}]}])
    assert r.prompt_text == "<|user|>\n<|image_1|>\n<|end|>\n<|assistant|>\n"
    assert r.image_sources == ["x.png"]


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty"),
        ("hello", "list"),
        ([{"role": "tool", "content": "x"}], "role 'tool'"),
        ([{"content": "x"}], "role"),
        ([{"role": "assistant", "content": [{"type": "image", "image": "a.png"}]}], "only allowed in user"),
        ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]}], "only allowed in user"),
        ([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], "unsupported part type 'audio'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "image_url"),
        ([{"role": "user", "content": [{"type": "text"}]}], "'text' part"),
        ([{"role": "user", "content": 42}], "content must be"),
        # literal tags mixed with image parts: which image is which is ambiguous
        ([{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                       {"type": "text", "text": "<|image_1|> vs this"}]}], "literal <\\|image_1\\|>"),
        ([{"role": "user", "content": "<|image_1|>\nlook"},
          {"role": "user", "content": [{"type": "image", "image": "a.png"}]}], "literal"),
    ],
)
def test_render_messages_rejects_bad_messages(messages, match):
    with pytest.raises(PromptError, match=match):
        render_messages(messages)


# --- render_prompt ------------------------------------------------------------------------------


def test_render_prompt_puts_tags_first_and_adds_system():
    assert render_prompt("Compare.", 2) == "<|user|>\n<|image_1|>\n<|image_2|>\nCompare.<|end|>\n<|assistant|>\n"
    assert render_prompt("Hi", 0, system="Be brief.") == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"


def test_render_prompt_keeps_existing_tags_in_place():
    assert render_prompt("A <|image_2|> and <|image_1|>?", 2) == (
        "<|user|>\nA <|image_2|> and <|image_1|>?<|end|>\n<|assistant|>\n"
    )
    with pytest.raises(PromptError, match="only 1 image"):
        render_prompt("<|image_1|><|image_2|>", 1)


# --- tag validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, counts, match",
    [
        ("<|image_0|>x", [5], "image_0"),  # tags start at 1
        ("<|image_1|>a<|image_3|>b", [5, 5, 5], "no <\\|image_2\\|> tag"),  # gap
        ("<|image_1|>a<|image_3|>b", [5, 5], "<\\|image_3\\|> but only 2"),  # gap, beyond the images
        ("<|image_1|>a<|image_2|>b", [5], "only 1 image"),  # more tags than images
        ("<|image_1|>a", [5, 5], "no <\\|image_2\\|> tag"),  # fewer tags than images
        ("<|image_1|>a<|image_1|>b", [5], "more than once"),  # repeat
        ("<|image_1|>a", [], "no images"),  # tags without images
        ("no tags here", [5], "no <\\|image_N\\|> tags"),  # images without tags
        ("<|image_1|>a", [0], "positive"),
    ],
)
def test_build_input_ids_rejects_bad_tags(tok, prompt, counts, match):
    with pytest.raises(PromptError, match=match):
        build_input_ids(tok, prompt, counts)


def test_check_image_tags_returns_text_order():
    assert check_image_tags("<|image_3|><|image_1|>x<|image_2|>", 3) == [3, 1, 2]
    assert check_image_tags("plain <|image|> text", 0) == []  # <|image|> is not a numbered tag
