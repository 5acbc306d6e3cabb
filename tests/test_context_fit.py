"""Does a request fit the context? `Phi3V.check_fits(prepared, max_new_tokens)` is the one rule.

check_fits raises PromptTooLongError when prompt tokens + max_new_tokens exceed the context; its
default (max_new_tokens=1) asks only for room for one new token. Generation itself (generate /
stream with a large max_new_tokens) does not raise for a prompt that fits: it caps the answer at
the room left and ends with finish_reason "length". The server calls check_fits with the
client's max_tokens (OpenAI's rule: prompt + max_tokens must fit).
"""

from __future__ import annotations

import pytest

import phi3v
from phi3v.errors import PromptTooLongError

CONTEXT = 40


@pytest.fixture(scope="module")
def small(tiny_model_dir):
    """The tiny model with its usable context cut to CONTEXT tokens."""
    return phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False, max_context=CONTEXT)


def test_check_fits_counts_the_requested_new_tokens(small):
    prepared = small.prepare(prompt="Hello there")
    n = prepared.num_tokens
    room = CONTEXT - n
    assert room > 2
    small.check_fits(prepared)  # default: room for one new token
    small.check_fits(prepared, room)  # prompt + max_new_tokens == context: fits exactly
    with pytest.raises(PromptTooLongError) as err:
        small.check_fits(prepared, room + 1)
    assert (err.value.prompt_tokens, err.value.image_tokens, err.value.limit) == (n, 0, CONTEXT)
    message = str(err.value)
    assert f"{n} tokens" in message and f"{room + 1}" in message and f"{CONTEXT} tokens" in message


def test_check_fits_default_refuses_a_prompt_that_fills_the_context(small):
    prepared = small.prepare(prompt="word " * CONTEXT)
    assert prepared.num_tokens >= CONTEXT
    with pytest.raises(PromptTooLongError) as err:
        small.check_fits(prepared)
    assert err.value.prompt_tokens == prepared.num_tokens


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, None])
def test_check_fits_needs_a_positive_token_count(small, bad):
    with pytest.raises(phi3v.Phi3VError, match="max_new_tokens"):
        small.check_fits(small.prepare(prompt="Hi"), bad)


def test_generation_caps_at_the_room_left_instead_of_raising(small):
    """A default (or too large) max_new_tokens is not an error for generation: it stops at the context."""
    prepared = small.prepare(prompt="Hello there")
    completion = small.generate(prepared, phi3v.GenerationOptions(max_new_tokens=10_000, temperature=0.0))
    assert completion.usage.prompt_tokens + completion.usage.completion_tokens <= CONTEXT
    if completion.finish_reason == "length":  # a random model may stop early on a stop id
        assert completion.usage.prompt_tokens + completion.usage.completion_tokens == CONTEXT
