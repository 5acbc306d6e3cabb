"""A prompt from standard input (cli/stdin_prompt.py): `echo "question" | phi3v ask IMG`, `-p -`,
`--prompt -` on the task commands, and the usage errors when stdin cannot carry it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

GEN = ("--max-tokens", "4", "--num-crops", "1", "--json", "-q")


@pytest.fixture
def cli(run_cli, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("PHI3V_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("NO_COLOR", "1")
    return run_cli


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("stdin_prompt") / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def test_piped_question_is_the_prompt_and_answers_as_with_p(cli, photo, tiny_model):
    code, out, err = cli("ask", photo, *GEN, stdin="What is in this picture?\n")
    assert code == 0, err
    piped = json.loads(out)
    assert piped["prompt"] == "What is in this picture?"
    code, out, err = cli("ask", photo, "-p", "What is in this picture?", *GEN)
    assert code == 0, err
    assert json.loads(out)["text"] == piped["text"]


def test_dash_p_dash_reads_stdin_and_a_flag_wins_over_a_pipe(cli):
    code, out, err = cli("ask", "-p", "-", *GEN, stdin="Name a colour.")
    assert code == 0 and json.loads(out)["prompt"] == "Name a colour.", err
    code, out, err = cli("ask", "-p", "From the flag.", *GEN, stdin="ignored")
    assert code == 0 and json.loads(out)["prompt"] == "From the flag.", err


def test_task_prompt_dash_reads_stdin(cli):
    code, out, err = cli("describe", "--prompt", "-", "--show-prompt", stdin="My own prompt\n")
    assert (code, out) == (0, "My own prompt\n"), err


@pytest.mark.parametrize("argv, stdin, expected", [
    (("ask", "-"), "question", "stdin holds the image (IMAGE -), so it cannot hold the prompt too"),
    (("ask", "-p", "-", "-"), "question", "stdin holds the image"),
    (("ask",), "", "a question is required"),
    (("ask", "-p", "-"), "  \n", "the prompt read from stdin is empty"),
])
def test_stdin_prompt_usage_errors(cli, argv, stdin, expected):
    code, out, err = cli(*argv, stdin=stdin)
    assert code == 2 and expected in err, err
