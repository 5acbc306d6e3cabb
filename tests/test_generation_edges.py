"""Extreme generation options at the Python API: a clear Phi3VError, or a valid generation.

Issue 11: seeds outside torch's range, a temperature or top_p that rounds to 0 in float32 and
bools or text where numbers belong crashed inside generation (or were silently coerced).
Text that is not valid Unicode (a lone surrogate) is a PromptError, not a TypeError from the
tokenizer. Decisions: any integer is a seed (outside torch's range, reduced modulo 2**64); a temperature
below float32's smallest normal number is greedy; top_p always keeps the top token.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import phi3v
from phi3v.engine.sampling import Sampler, torch_seed
from phi3v.errors import Phi3VError, PromptError


@pytest.mark.parametrize("kwargs, words", [
    ({"seed": 1.5}, "seed must be an integer"),
    ({"seed": True}, "seed must be an integer"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
    ({"max_new_tokens": "10"}, "max_new_tokens must be an integer"),
    ({"temperature": "0.5"}, "temperature must be a number"),
    ({"temperature": math.nan}, "temperature must be a finite number"),
    ({"repetition_penalty": math.inf}, "repetition_penalty must be a finite number"),
    ({"stop": 5}, "stop must be a string or a list of strings"),
])
def test_bad_options_are_a_phi3v_error(kwargs, words):
    with pytest.raises(Phi3VError, match=words):
        phi3v.GenerationOptions(**kwargs)


def test_numpy_numbers_become_python_numbers():
    opts = phi3v.GenerationOptions(seed=np.int64(3), temperature=1, max_new_tokens=np.int32(4))
    assert (type(opts.seed), type(opts.temperature), type(opts.max_new_tokens)) == (int, float, int)


def _draws(seed, n=8):
    sampler = Sampler(phi3v.GenerationOptions(seed=seed, temperature=5.0), "cpu")
    return [sampler(torch.zeros(50), None) for _ in range(n)]


def test_any_integer_is_a_seed():
    assert torch_seed(2**64 - 1) == 2**64 - 1 and torch_seed(-2**63) == -2**63  # torch's own range, as it is
    assert _draws(2**64 + 5) == _draws(5)  # outside it: modulo 2**64
    assert _draws(-2**63 - 1) == _draws(2**64 - 2**63 - 1)
    assert _draws(10**40) == _draws(10**40 % 2**64) != _draws(10**40 % 2**64 + 1)


LOGITS = torch.tensor([1.0, 3.0, 2.5, -1.0, 0.0])


@pytest.mark.parametrize("kwargs, expected", [
    ({"temperature": 1e-300}, 1),  # rounds to 0 in float32: greedy, its limit
    ({"temperature": 1e-30}, 1),  # representable, tiny: the best token's probability is 1
    ({"temperature": 1.0, "top_p": 1e-300}, 1),  # top_p rounds to 0: the top token is kept
    ({"temperature": 1.0, "top_p": 5e-324}, 1),
])
def test_extreme_sampling_values_pick_the_best_token(kwargs, expected):
    sampler = Sampler(phi3v.GenerationOptions(seed=0, **kwargs), "cpu")
    assert [sampler(LOGITS, None) for _ in range(5)] == [expected] * 5


@pytest.mark.parametrize("penalty", [1e-300, 5e-324, 1e300])
def test_extreme_repetition_penalty_gives_a_valid_distribution(penalty):
    seen = torch.tensor([0, 1, 4])  # includes a 0.0 score (0 / 0 is NaN when the penalty rounds to 0)
    for temperature in (0.0, 0.7):
        sampler = Sampler(phi3v.GenerationOptions(seed=1, temperature=temperature, repetition_penalty=penalty),
                          "cpu")
        assert 0 <= sampler(LOGITS, seen) < LOGITS.numel()


def test_lone_surrogate_is_a_prompt_error(tiny_model):
    for kwargs in ({"prompt": "x\ud800y"}, {"messages": [{"role": "user", "content": "ok \udfff"}]}):
        with pytest.raises(PromptError, match="lone surrogate"):
            tiny_model.prepare(**kwargs)
    assert tiny_model.prepare(prompt="naïve 日本 🙂").input_ids  # real non-ASCII text is fine


def test_tiny_temperature_generates_like_greedy(tiny_model):
    prepared = tiny_model.prepare(prompt="Hello there")
    greedy = tiny_model.generate(prepared, phi3v.GenerationOptions(max_new_tokens=4))
    tiny = tiny_model.generate(prepared, phi3v.GenerationOptions(max_new_tokens=4, temperature=1e-300, seed=2**64 - 1))
    assert tiny.text == greedy.text
    nucleus = tiny_model.generate(prepared, phi3v.GenerationOptions(max_new_tokens=4, temperature=1.0, top_p=1e-300))
    assert nucleus.text == greedy.text  # only the top token survives top_p
